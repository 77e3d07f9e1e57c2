"""Per-operator benchmark: where tuned TVM loses to onnxruntime on one zoo model (batch 1, host CPU).

Exports the model to ONNX (verified against torch), MetaSchedule-tunes it for the host into the per-target
tuning database (tasks already tuned there with >= --tune-trials trials are reused), compiles it, then times
every operator in both runtimes (edgecompact.deploy.opprofile: TVM kernel calls one by one with
time_evaluator, onnxruntime nodes with its profiler), matches them by conv shape, and times both end to end,
interleaved, at each --e2e-threads count. Writes benchmarks/operators_prepack.json and .md (default --out)
(format: ../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from edgecompact.deploy import bench, opprofile
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import tvm as etvm
from edgecompact.deploy.artifact import relax_module
from edgecompact.deploy.peak import fp32_peak_gflops
from edgecompact.models import create_model
from edgecompact.report import bench_document, machine, source_commit
from edgecompact.targets import get_target


def _row(t: opprofile.Op | None, o: opprofile.Op | None, peak: float) -> dict[str, Any]:
    op = t or o
    assert op is not None
    row: dict[str, Any] = {"name": op.describe(), "op": op.kind, "input": list(op.inputs), "output": list(op.output)}
    if op.kernel:
        row["kernel"] = list(op.kernel)
    if t is not None:
        row["tvm_op"], row["tvm_us"] = t.name, round(t.us, 2)
    if o is not None:
        row["ort_op"], row["ort_us"] = o.name, round(o.us, 2)
    if t is not None and o is not None and o.us > 0:
        row["ratio"] = round(t.us / o.us, 2)
    flops = t.flops if t is not None else None
    if flops:  # each runtime's GFLOP/s and share of the measured one-core peak (a conv's weight gives its FLOPs)
        row["mflops"] = round(flops / 1e6, 3)
        for key, op in (("tvm", t), ("ort", o)):
            if op is not None and op.us > 0:
                row[f"{key}_gflops"] = round(flops / (op.us * 1e3), 2)
                row[f"{key}_pct_peak"] = round(100 * row[f"{key}_gflops"] / peak, 1)
    return row


def conv_share_of_peak(rows: list[dict[str, Any]], peak: float) -> dict[str, float]:
    """Each runtime's 3x3 convolutions together: their FLOPs over their summed time, as a % of the one-core peak."""
    convs = [r for r in rows if r.get("kernel") == [3, 3] and "mflops" in r]
    out = {}
    for key in ("tvm", "ort"):
        timed = [r for r in convs if f"{key}_us" in r]
        us = sum(r[f"{key}_us"] for r in timed)
        if us > 0:
            out[key] = round(100 * sum(r["mflops"] for r in timed) * 1e6 / (us * 1e3) / peak, 1)
    return out


def _end_to_end(vm: Any, sess: Any, x: np.ndarray, threads: int, runs: int, lib: Path) -> dict[str, Any]:
    """Paired (interleaved) medians of TVM and onnxruntime at `threads` threads, plus TVM's time_evaluator."""
    etvm.set_num_threads(threads)
    dev = tvm.cpu()
    inp = tvm.runtime.tensor(x, dev)
    name = sess.get_inputs()[0].name
    tvm_ms, ort_ms = bench.paired_median_ms(lambda: vm["main"](inp), lambda: sess.run(None, {name: x}), runs)
    return {"name": f"end-to-end, {threads} thread(s)", "threads": threads, "runs": runs,
            "latency_ms": {"host-tvm": round(tvm_ms, 4), "host-ort": round(ort_ms, 4),
                           "host-tvm-time_evaluator": round(bench.time_tvm(lib, x, runs), 4)},
            "tvm_over_ort": round(tvm_ms / ort_ms, 2)}


def _markdown(out: dict[str, Any]) -> str:
    rows = [r for r in out["results"] if "op" in r]
    e2e = [r for r in out["results"] if r["name"].startswith("end-to-end")]
    s = next(r for r in out["results"] if r["name"] == "summary")
    tun = out["tuning"]
    pk = out["peak"]
    lines = [f"# operator benchmark: {out['model']}\n", f"{out['protocol']}\n", f"Machine: {out['machine']}.  ",
             (f"Measured fp32 peak of one core: {pk['gflops_per_core']} GFLOP/s ({pk['kernel']}); 3x3 convolutions "
             f"together reach {s['conv3x3_pct_peak'].get('tvm', '-')}% of it on TVM, "
             f"{s['conv3x3_pct_peak'].get('ort', '-')}% on onnxruntime.  "),
             f"Command: `{out['command']}`; commit {s['commit']}.  ",
             f"Tuning database `{tun['db']}`, {tun.get('tasks', '?')} conv/matmul tasks"
             + (f", filled by {len(tun['tuning_run'].get('runs', [1]))} tuning run(s): "
                f"{tun['tuning_run']['trials_per_task']}"
                + (" trials per task" if isinstance(tun["tuning_run"]["trials_per_task"], int) else "")
                + f", {tun['tuning_run']['trials']} trials, "
                f"{tun['tuning_run']['tuning_s']} s of tuning in all (JSON: tuning.tuning_run)" if "tuning_run" in tun
                else "")
             + f"; this run: --tune-trials {tun['trials_per_task']}, tuned {tun.get('tuned_tasks', 0)} task(s) in "
             f"{tun.get('tuning_s', 0)} s.\n",
             "## End to end (median ms, TVM and onnxruntime calls interleaved)\n",
             "| threads | TVM (ms) | ORT (ms) | TVM / ORT | TVM time_evaluator (ms) |", "|---|---|---|---|---|"]
    for r in e2e:
        lat = r["latency_ms"]
        lines.append(f"| {r['threads']} | {lat['host-tvm']:.3f} | {lat['host-ort']:.3f} | {r['tvm_over_ort']} | "
                     f"{lat['host-tvm-time_evaluator']:.3f} |")
    if tun.get("convergence"):
        marks = sorted({int(m) for t in tun["convergence"] for m in t["best_us"]})
        lines += ["", ("## Tuning convergence (the tuner's own timings: the best candidate's mean us among a task's "
                  "first n records; timed while other jobs may have run)\n"),
                  "| task | records | " + " | ".join(f"best of {m}" for m in marks) + " |",
                  "|---|---|" + "---|" * len(marks)]
        for t in tun["convergence"]:
            lines.append(f"| {t['task']} | {t['records']} | "
                         + " | ".join(str(t["best_us"].get(str(m), "")) for m in marks) + " |")
    lines += ["", (f"## Per operator ({s['threads']} thread(s); TVM: each kernel call timed alone; ORT: its "
              "profiler; both medians, measured interleaved)\n"),
              "| # | op | shape | TVM kernel | TVM (us) | ORT node | ORT (us) | TVM / ORT | TVM % of peak | ORT % of peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        tvm_cells = f"{r['tvm_op']} | {r['tvm_us']:.1f}" if "tvm_us" in r else "- | -"
        ort_cells = f"{r['ort_op'].removesuffix('_nchwc')} | {r['ort_us']:.1f}" if "ort_us" in r else "- | -"
        lines.append(f"| {i} | {r['op']} | {r['name']} | {tvm_cells} | {ort_cells} | {r.get('ratio', '-')} | "
                     f"{r.get('tvm_pct_peak', '-')} | {r.get('ort_pct_peak', '-')} |")
    lines += ["", "| kind | count | TVM (us) | ORT (us) | TVM / ORT |", "|---|---|---|---|---|"]
    for kind, k in s["by_kind"].items():
        ratio = f"{k['tvm_us'] / k['ort_us']:.2f}" if k["ort_us"] and k["tvm_us"] else "-"
        lines.append(f"| {kind} | {k['count']} | {k['tvm_us']:.1f} | {k['ort_us']:.1f} | {ratio} |")
    lines.append(f"| **all** | {len(rows)} | {s['tvm_us']:.1f} | {s['ort_us']:.1f} | "
                 f"{s['tvm_us'] / s['ort_us']:.2f} |")
    lines += ["", (f"Sum of TVM kernels {s['tvm_us'] / 1e3:.3f} ms vs TVM end to end {s['tvm_evaluator_e2e_ms']:.3f} ms "
              f"(time_evaluator, no Python): {s['tvm_vm_overhead_ms']:.3f} ms outside the kernels (VM, allocation, "
              "builtins, cold caches). Sum of ORT nodes "
              f"{s['ort_us'] / 1e3:.3f} ms (profiler on) vs ORT end to end {s['ort_e2e_ms']:.3f} ms (profiler off)."),
              (f"Convolutions: TVM {s['by_kind'].get('conv', {}).get('tvm_us', 0) / 1e3:.3f} ms = "
              f"{s['conv_share_tvm']:.0%} of TVM's kernel time. Largest single loss: {s['worst']['name']} "
              f"({s['worst']['tvm_op']}), {s['worst']['tvm_us']:.1f} vs {s['worst']['ort_us']:.1f} us "
              f"({s['worst']['ratio']}x). TVM output vs onnxruntime: max abs error {s['max_abs_err_vs_ort']:.2g}.\n")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--onnx", type=Path, default=None,
                    help="time this exported model instead of --model (e.g. a search's deploy/host/compact/model.onnx)")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads of both runtimes (and of tuning measurements)")
    ap.add_argument("--e2e-threads", default="1,2", help="thread counts of the end-to-end comparison")
    ap.add_argument("--tune-trials", type=int, default=32, help="MetaSchedule trials per conv/matmul task")
    ap.add_argument("--db", type=Path, default=None, help="tuning database (default: the host's per-target db)")
    ap.add_argument("--tuning-summary", type=Path, default=None,
                    help="JSON summary of the earlier run that tuned this db (recorded when this run reuses it)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_operators"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/operators_prepack.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    etvm.set_num_threads(args.threads)  # before tuning: the tuner's runner workers inherit TVM_NUM_THREADS
    torch.manual_seed(0)
    load = os.getloadavg()[0]  # runnable processes on the cores as the run starts (a paused job counts none)
    commit = source_commit(Path(__file__).resolve().parent.parent)
    peak = fp32_peak_gflops()  # before anything else runs here: the yardstick of every operator's share

    target = get_target("host")
    db = args.db or etvm.default_db_dir(target)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.onnx is not None:  # a compact (or any exported model): its own input shape
        if not args.onnx.is_file():
            sys.exit(f"error: --onnx {args.onnx}: no such file")
        onnx_path, args.model = args.onnx, str(args.onnx)
        mod, spec = relax_module(onnx_path)
        shape = tuple(spec[1])
    else:
        shape = (1, 3, args.input_size, args.input_size)
        model = create_model(args.model, input_size=args.input_size).eval()
        onnx_path = args.work / "model.onnx"
        eonnx.export_onnx(model, shape, onnx_path)
        mod = from_onnx(onnx.load(str(onnx_path)), shape_dict={eonnx.INPUT_NAME: list(shape)})

    tuning: dict[str, Any] = {"trials_per_task": args.tune_trials, "db": str(db)}
    if args.tune_trials > 0:
        t0 = time.perf_counter()
        tuning.update(etvm.tune(mod, target, args.tune_trials, db))
        tuning["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.tuning_summary:
        tuning["tuning_run"] = json.loads(args.tuning_summary.read_text())
    t0 = time.perf_counter()
    ex = etvm.compile_relax(mod, target, db_dir=db)
    compile_s = round(time.perf_counter() - t0, 1)
    lib = etvm.export_library(ex, args.work / "model.so", target)

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    want = eonnx.run_onnx(onnx_path, x, args.threads)
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    max_err = float(np.abs(got - want).max())

    etvm.set_num_threads(args.threads)
    tvm_ops, ort_ops = opprofile.op_times(ex, onnx_path, x, threads=args.threads, ort_runs=args.runs)
    pairs = opprofile.match_ops(tvm_ops, ort_ops)
    rows = [_row(t, o, peak["gflops_per_core"]) for t, o in pairs]

    e2e = [_end_to_end(vm, eonnx.session(onnx_path, n), x, n, args.runs, lib)
           for n in map(int, args.e2e_threads.split(","))]
    etvm.set_num_threads(args.threads)
    base = next((r for r in e2e if r["threads"] == args.threads), e2e[0])
    totals = opprofile.summarize(pairs)
    worst = max((r for r in rows if "ratio" in r), key=lambda r: r["tvm_us"] - r["ort_us"])  # largest loss in us
    totals["by_kind"] = {kind: {k: round(v, 2) for k, v in d.items()} for kind, d in totals["by_kind"].items()}
    summary = {"name": "summary", "threads": args.threads, **{k: round(v, 2) if isinstance(v, float) else v
                                                               for k, v in totals.items()},
               "tvm_e2e_ms": base["latency_ms"]["host-tvm"], "ort_e2e_ms": base["latency_ms"]["host-ort"],
               "tvm_evaluator_e2e_ms": base["latency_ms"]["host-tvm-time_evaluator"],
               "tvm_vm_overhead_ms": round(base["latency_ms"]["host-tvm-time_evaluator"] - totals["tvm_us"] / 1e3, 4),
               "conv_share_tvm": round(totals["by_kind"].get("conv", {}).get("tvm_us", 0) / totals["tvm_us"], 3),
               "worst": {k: worst[k] for k in ("name", "tvm_op", "tvm_us", "ort_us", "ratio")},
               "max_abs_err_vs_ort": max_err, "compile_s": compile_s,
               "conv3x3_pct_peak": conv_share_of_peak(rows, peak["gflops_per_core"])}

    out = {
        **bench_document("operators", "python " + " ".join(sys.argv), "", []),
        "machine": f"{machine()}; LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}, "
                   f"TVM target {etvm.tvm_target(target)}; load average {load:.2f} as the run started",
        "model": args.model,
        "protocol": f"{args.model}, input {'x'.join(map(str, shape))}, fp32, batch 1, {args.threads} thread(s) for "
                    f"TVM and onnxruntime (TVM tuned with its runner at the same count); per operator: TVM kernel "
                    f"calls of one run each timed alone (time_evaluator, median of 15 means of 20 calls), "
                    f"onnxruntime node durations from its profiler (median of {args.runs} runs after 20 warm-up), "
                    f"the two interleaved in 15 rounds; ops matched by kind + input/output shape + kernel; end to "
                    f"end: median of {args.runs} runs, TVM and onnxruntime calls interleaved",
        "tuning": tuning,
        "peak": peak,
        "results": [{**r, "commit": commit} for r in rows + e2e + [summary]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    md = _markdown(out)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
