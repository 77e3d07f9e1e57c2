"""Wall time to build a host LatencyTable for a search space (goal: ResNet-32 in <= 10 min on 2 cores).

Writes the table (default profiles/host-fp32-<model>.json) and benchmarks/profile_cost.json + .md.
Run: python tools/bench_profile_cost.py --model resnet32 [--tune-trials 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--target", default="host")
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="TVM runtime threads (1: the other core is shared)"
    )
    ap.add_argument(
        "--out", type=Path, help="table path (default profiles/<target>-<precision>-<model>.json)"
    )
    ap.add_argument("--force", action="store_true", help="replace an existing table instead of refusing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import tvm

    from edgecompact.cost.latency import default_table_path
    from edgecompact.deploy.tvm import set_num_threads
    from edgecompact.models import create_model, model_defaults
    from edgecompact.profiling import profile
    from edgecompact.structure import analyze
    from edgecompact.targets import get_target

    set_num_threads(args.threads)
    target = get_target(args.target)
    size = model_defaults(args.model).input_size
    structure = analyze(create_model(args.model), (3, size, size), args.model)
    out = args.out or default_table_path(target, args.model)
    if out.exists():
        if not args.force:
            sys.exit(
                f"{out} exists: a resumed run would not measure the full cost; pass --force to replace it"
            )
        out.unlink()
    start = time.perf_counter()
    table = profile(structure, target, out, tune_trials=args.tune_trials)
    wall = time.perf_counter() - start
    points = sum(len(e.points()) for e in table.entries.values())
    record = {
        "name": f"profile-{args.target}-{args.model}",
        "model": args.model,
        "target": args.target,
        "layer_kinds": len(table.entries),
        "grid_points": points,
        "tune_trials": args.tune_trials,
        "tvm_threads": args.threads,
        "wall_s": round(wall, 1),
        "s_per_point": round(wall / points, 3),
        "goal_s": 600,
        "met": wall <= 600,
        "baseline_predicted_ms": round(
            table.predict(structure, structure.baseline_widths(), corrected=False), 3
        ),
        "table": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
    }
    doc = {
        "benchmark": "profile_cost",
        "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, no GPU; "
        "shared with other jobs",
        "date": datetime.date.today().isoformat(),
        "versions": {
            "edgecompact": _version(),
            "torch": torch.__version__.split("+")[0],
            "tvm": tvm.__version__,
        },
        "protocol": f"{args.model} search space (each group 1/8..full width), {args.target}, "
        f"untuned={args.tune_trials == 0}, per grid point: {table.provenance['statistic']}",
        "results": [record],
    }
    bench = ROOT / "benchmarks"
    bench.mkdir(exist_ok=True)
    (bench / "profile_cost.json").write_text(json.dumps(doc, indent=1) + "\n")
    (bench / "profile_cost.md").write_text(
        f"# Profile cost\n\n`{doc['command']}` on {doc['machine']}\n"
        f"({doc['date']}, TVM {tvm.__version__}).\n\n"
        "| model | target | layer kinds | grid points | tune trials | TVM threads | wall (s) | s/point | "
        "goal (s) | met |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.target} | {record['layer_kinds']} | {points} | {args.tune_trials} | "
        f"{args.threads} | {record['wall_s']} | {record['s_per_point']} | 600 | "
        f"{'yes' if record['met'] else 'no'} |\n"
    )
    print(json.dumps(record, indent=1))


def _version() -> str:
    import edgecompact

    return edgecompact.__version__


if __name__ == "__main__":
    main()
