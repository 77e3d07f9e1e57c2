"""Wall time to build a host LatencyTable for a search space (goal: ResNet-32 in <= 10 min on 2 cores).

Writes the table (default profiles/<target>-<precision>-<model>.json) and benchmarks/profile_cost.json + .md;
records of other (model, input, runtime) settings already in the JSON are kept.
Run: python tools/bench_profile_cost.py --model resnet32 [--runtime onnxruntime|tvm] [--input-size 28]
     [--in-channels 1] [--threads 1] [--tune-trials 0] [--out PATH] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from edgecompact.report import machine

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--target", default="host")
    ap.add_argument("--runtime", choices=["tvm", "onnxruntime"], help="default: the target's runtime")
    ap.add_argument("--input-size", type=int, help="input HxW (default: the model's)")
    ap.add_argument("--in-channels", type=int, default=3, help="image channels (1 for Fashion-MNIST)")
    ap.add_argument(
        "--channel-multiple",
        type=int,
        help="grid widths in multiples of this (default: the target's constraint)",
    )
    ap.add_argument("--tune-trials", type=int, default=0, help="TVM only")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="runtime threads, TVM or onnxruntime (1: the other core is shared)",
    )
    ap.add_argument(
        "--out", type=Path, help="table path (default profiles/<target>-<precision>-<model>.json)"
    )
    ap.add_argument("--force", action="store_true", help="replace an existing table instead of refusing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnxruntime
    import tvm

    from edgecompact.cost.latency import default_table_path
    from edgecompact.deploy.tvm import set_num_threads
    from edgecompact.models import create_model, model_defaults
    from edgecompact.profiling import profile
    from edgecompact.structure import analyze
    from edgecompact.targets import get_target

    set_num_threads(args.threads)
    target = get_target(args.target)
    if args.channel_multiple:
        target = dataclasses.replace(target, channel_multiple=args.channel_multiple)
    runtime = args.runtime or target.runtime
    size = args.input_size or model_defaults(args.model).input_size
    model = create_model(args.model, in_channels=args.in_channels, input_size=size)
    structure = analyze(model, (args.in_channels, size, size), args.model)
    out = args.out or default_table_path(target, args.model)
    if out.exists():
        if not args.force:
            sys.exit(
                f"{out} exists: a resumed run would not measure the full cost; pass --force to replace it"
            )
        out.unlink()
    start = time.perf_counter()
    table = profile(
        structure, target, out, runtime=runtime, threads=args.threads, tune_trials=args.tune_trials
    )
    wall = time.perf_counter() - start
    points = sum(len(e.points()) for e in table.entries.values())
    record = {
        "name": f"profile-{args.target}-{args.model}-{args.in_channels}x{size}x{size}-{runtime}"
        f"-m{target.channel_multiple}",
        "model": args.model,
        "input": [args.in_channels, size, size],
        "target": args.target,
        "runtime": runtime,
        "channel_multiple": target.channel_multiple,
        "layer_kinds": len(table.entries),
        "grid_points": points,
        "tune_trials": args.tune_trials if runtime == "tvm" else None,
        "threads": args.threads,
        "wall_s": round(wall, 1),
        "s_per_point": round(wall / points, 3),
        "goal_s": 600,
        "met": wall <= 600,
        "baseline_predicted_ms": round(
            table.predict(structure, structure.baseline_widths(), corrected=False), 3
        ),
        "table": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
        "statistic": table.provenance["statistic"],
        "date": datetime.date.today().isoformat(),
    }
    record = {k: v for k, v in record.items() if v is not None}
    old = BENCH / "profile_cost.json"
    kept = []
    if old.is_file():
        kept = [r for r in json.loads(old.read_text())["results"] if r.get("name") != record["name"]]
    doc = {
        "benchmark": "profile_cost",
        "command": "python tools/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{machine()}; shared with other jobs",
        "date": datetime.date.today().isoformat(),
        "versions": {
            "edgecompact": _version(),
            "torch": torch.__version__.split("+")[0],
            "tvm": tvm.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "protocol": "a model's search space (each group 1/8..full width) on a target, every grid point timed "
        "with the runtime the record names (TVM untuned unless tune_trials > 0), per grid point: "
        f"{table.provenance['statistic']}; each record's command is in `commands`",
        "results": [*kept, record],
    }
    commands = {r["name"]: r.get("command") for r in kept}
    commands[record["name"]] = doc["command"]
    for r in doc["results"]:
        r["command"] = commands[r["name"]]
    BENCH.mkdir(exist_ok=True)
    old.write_text(json.dumps(doc, indent=1) + "\n")
    rows = [
        f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['target']} | {r['runtime']} | "
        f"{r.get('channel_multiple', 1)} | "
        f"{r['layer_kinds']} | {r['grid_points']} | {r.get('tune_trials', '')} | {r['threads']} | "
        f"{r['wall_s']} | {r['s_per_point']} | {r['goal_s']} | {'yes' if r['met'] else 'no'} | "
        f"{r['baseline_predicted_ms']} | `{r['command']}` |"
        for r in doc["results"]
    ]
    (BENCH / "profile_cost.md").write_text(
        f"# Profile cost\n\nOn {doc['machine']} ({doc['date']}, TVM {tvm.__version__}, onnxruntime "
        f"{onnxruntime.__version__}). {doc['protocol']}.\n\n"
        "| model | input | target | runtime | channel multiple | layer kinds | grid points | tune trials | threads | wall (s) | "
        "s/point | goal (s) | met | baseline predicted ms (sum of layers) | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(json.dumps(record, indent=1))


def _version() -> str:
    import edgecompact

    return edgecompact.__version__


if __name__ == "__main__":
    main()
