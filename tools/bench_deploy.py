"""Deploy benchmark: a zoo baseline vs its 1/3-FLOPs compact on the host.

The compact is uniformly thinned, or (`--arch-from BENCH.json:METHOD`) the architecture a method found in a
methods benchmark (weights re-initialised: latency does not depend on them). Exports both (ONNX verified against
torch, MetaSchedule-tuned TVM build), then times torch eager, onnxruntime and TVM in this one process (batch 1,
median of >= 50 runs, explicit thread counts); speedups come from baseline and compact timed interleaved.
Writes benchmarks/deploy.json and benchmarks/deploy.md (format: ../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import tvm

from edgecompact.budget import fit_uniform
from edgecompact.cost.flops import arch_flops, module_flops, module_params
from edgecompact.deploy.artifact import export_artifact
from edgecompact.deploy.bench import bench_artifacts
from edgecompact.deploy.peak import fp32_peak_gflops
from edgecompact.deploy.tvm import default_db_dir
from edgecompact.errors import ConfigError
from edgecompact.models import create_model
from edgecompact.report import bench_document
from edgecompact.structure import analyze, keep_from_scores, slim
from edgecompact.targets import get_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=1 / 3, help="compact FLOPs / baseline FLOPs")
    ap.add_argument("--tune-trials", type=int, default=16, help="MetaSchedule trials per conv/matmul task")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch-from", default=None, metavar="BENCH.json:METHOD",
                    help="take the compact's widths from a methods benchmark record (default: uniform thinning)")
    ap.add_argument("--db", type=Path, default=None, help="tuning database (default: the host's shared one)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_deploy"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/deploy.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shape = (3, args.input_size, args.input_size)
    baseline = create_model(args.model, input_size=args.input_size).eval()
    structure = analyze(baseline, shape, args.model)
    base_flops = module_flops(baseline, shape)
    if args.arch_from:
        bench_path, _, method = args.arch_from.rpartition(":")
        try:
            doc = json.loads(Path(bench_path).read_text())
            row = next(r for r in doc["results"] if r["name"] == method)
            widths = row.get("widths") or row["per_seed"][0]["widths"]  # seeded benchmarks: seed 0's network
        except (OSError, json.JSONDecodeError, KeyError, StopIteration) as e:
            raise SystemExit(f"--arch-from {args.arch_from}: no widths for '{method}' ({type(e).__name__})") from None
        if doc["results"][0].get("model") != args.model:
            raise SystemExit(f"--arch-from {args.arch_from}: a {doc['results'][0].get('model')} benchmark, "
                             f"not {args.model}")
        structure = analyze(baseline, shape, args.model, drop_blocks=True)
        compact_name = method
    else:
        widths = fit_uniform(structure, lambda w: arch_flops(structure, w), args.ratio * base_flops, 0.02)
        compact_name = "uniform"
    try:
        compact = slim(baseline, structure, keep_from_scores(structure, widths)).eval()
    except ConfigError as e:
        raise SystemExit(f"--arch-from {args.arch_from}: {e}") from None
    target = get_target("host")
    db = args.db or default_db_dir(target)

    records, models = [], {}
    for name, model in (("baseline", baseline), (compact_name, compact)):
        t0 = time.perf_counter()
        manifest_path = export_artifact(model, (1, *shape), target, args.work / name, tune_trials=args.tune_trials,
                                        db_dir=db, threads=args.threads, runs=args.runs, overwrite=True)
        manifest = json.loads(manifest_path.read_text())
        models[str(manifest_path.parent)] = model
        records.append({"name": name, "model": args.model, "mflops": round(module_flops(model, shape) / 1e6, 2),
                        "params": module_params(model), "tuning": manifest["tuning"],
                        "export_s": round(time.perf_counter() - t0, 1), "artifact": str(manifest_path.parent)})
    # baseline and compact timed as a pair, runtime by runtime (interleaved: a shared machine's load hits both alike)
    bench = bench_artifacts([Path(r["artifact"]) for r in records], runs=args.runs, threads=args.threads,
                            models=models)
    for rec, b in zip(records, bench["results"], strict=True):
        rec["latency_ms"] = {k: v for k, v in b["latency_ms"].items() if not k.endswith("-baseline")}
    base, comp = records
    flop_ratio = base["mflops"] / comp["mflops"]
    summary = {"name": "summary", "flop_ratio": round(flop_ratio, 3), "paired": bench["results"][1]["paired"]}
    pairs = bench["results"][1]["measured_speedup"]
    for key, speedup in pairs.items():
        summary[f"paired_ms_{key}"] = [base["latency_ms"][key], comp["latency_ms"][key]]
        summary[f"speedup_{key}"] = speedup
        summary[f"speedup_over_flop_ratio_{key}"] = round(speedup / flop_ratio, 3)
    records.append(summary)

    protocol = (f"{args.model} baseline vs {compact_name} compact at {comp['mflops'] / base['mflops']:.3f} "
                f"FLOPs{' (from ' + args.arch_from + ')' if args.arch_from else ''}, batch 1, "
                f"{args.threads} thread(s) for torch/ORT/TVM, median of {args.runs} runs after warm-up, "
                f"same process; TVM MetaSchedule {args.tune_trials} trials per conv/matmul task")
    out = bench_document("deploy", "python " + " ".join(sys.argv), protocol, records)
    peak = fp32_peak_gflops()
    out["peak"] = peak  # the yardstick beside every timing: one core's measured fp32 FMA GFLOP/s
    out["machine"] = (f"{out['machine']}; LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}, "
                      f"{torch.get_num_threads()} torch thread(s), measured fp32 peak {peak['gflops_per_core']} "
                      "GFLOP/s per core, shared with other jobs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    keys = list(base["latency_ms"])
    lines = [(f"# deploy benchmark\n\n{out['protocol']}. Machine: {out['machine']}. Every ms below is from the "
             "interleaved pair (baseline and compact timed together; each model timed once per runtime).\n"),
             "| name | MFLOPs | params | " + " | ".join(f"{k} (ms)" for k in keys) + " | tuning (s) |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for r in (base, comp):
        tuning_s = r["tuning"].get("summary", {}).get("tuning_s", "")
        lines.append(f"| {r['name']} | {r['mflops']} | {r['params']} | "
                     + " | ".join(f"{r['latency_ms'][k]:.3f}" for k in keys) + f" | {tuning_s} |")
    lines.append(f"\nFLOP ratio {summary['flop_ratio']}; measured speedups (baseline and compact interleaved, "
                 f"median of {args.runs}): "
                 + ", ".join(f"{k} {summary['speedup_' + k]} ({summary['speedup_over_flop_ratio_' + k]} x the FLOP "
                             "ratio)" for k in pairs) + ".\n")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
