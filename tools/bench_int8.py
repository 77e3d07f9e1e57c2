"""int8 on the host: TVM against onnxruntime, both on the QDQ model deploy ships (batch 1, interleaved).

Exports a zoo model to ONNX (verified against torch), quantizes it as `edgecompact export --precision int8` does
(static QDQ, per-channel int8 weights, uint8 activations, this CPU's int8 settings; calibrated on --calib random
inputs: timing does not depend on the calibration), compiles the fp32 and the int8 model with TVM (the host's
tuning database applied, as deploy does; nothing tuned here unless --tune-trials), and times the four
(TVM/onnxruntime x fp32/int8) interleaved in one process at each thread count, median of --runs. Also records
what TVM made of the QDQ graph: the Relax operators the ONNX frontend produced, the compiled kernels one run calls
and whether any computes in 8-bit integers, and how far TVM's int8 output is from onnxruntime's.
Writes benchmarks/int8.json and .md (format: ../shared/BENCHMARKS.md).
Run: python tools/bench_int8.py --model resnet20
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from tvm import relax

from edgecompact.cpu import int8_scheme
from edgecompact.deploy import bench, opprofile
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import tvm as etvm
from edgecompact.deploy.artifact import relax_module
from edgecompact.deploy.peak import fp32_peak_gflops
from edgecompact.models import create_model
from edgecompact.report import bench_document, machine, source_commit
from edgecompact.targets import get_target


def relax_ops(mod: tvm.IRModule) -> dict[str, int]:
    """How many calls of each Relax operator the module's functions hold."""
    ops: collections.Counter[str] = collections.Counter()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func.body, lambda e: ops.update([e.op.name]) if isinstance(e, relax.Call) and hasattr(e.op, "name")
                else None)
    return dict(ops.most_common())


def kernel_census(ex: Any, x: np.ndarray) -> dict[str, Any]:
    """The compiled kernels one run of `main` calls: how many, how many (de)quantize, and the dtypes of the
    tensors the conv kernels read (8-bit integers would mean integer arithmetic)."""
    calls = opprofile.tvm_calls(ex, x)
    conv_dtypes = sorted({str(a.dtype) for name, args in calls if "conv2d" in name for a in args
                          if hasattr(a, "dtype")})
    return {"kernel_calls": len(calls),
            "quantize_calls": sum("quantize" in name for name, _ in calls),
            "conv_calls": sum("conv2d" in name for name, _ in calls),
            "conv_arg_dtypes": conv_dtypes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--threads", default="1,2", help="thread counts (both runtimes)")
    ap.add_argument("--calib", type=int, default=64, help="random calibration inputs")
    ap.add_argument("--tune-trials", type=int, default=0, help="tune the int8 model's tasks first (0: apply the db)")
    ap.add_argument("--db", type=Path, default=None, help="tuning database (default: the host's per-CPU db)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_int8"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/int8.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    etvm.set_num_threads(1)
    peak = fp32_peak_gflops()
    target = get_target("host")
    db = args.db or etvm.default_db_dir(target)
    args.work.mkdir(parents=True, exist_ok=True)
    shape = (1, 3, args.input_size, args.input_size)
    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size).eval()
    paths = {"fp32": args.work / "model.onnx", "int8": args.work / "model.int8.onnx"}
    eonnx.export_onnx(model, shape, paths["fp32"])
    rng = np.random.default_rng(0)
    scheme = int8_scheme()
    eonnx.quantize_int8(paths["fp32"], paths["int8"], rng.standard_normal((args.calib, *shape[1:])).astype(np.float32),
                        scheme)

    mods, exes, compile_s, tuning = {}, {}, {}, {}
    for prec, path in paths.items():
        mods[prec] = relax_module(path)[0]
        if args.tune_trials > 0:
            tuning[prec] = etvm.tune(mods[prec], target, args.tune_trials, db)
        t0 = time.perf_counter()
        exes[prec] = etvm.compile_relax(mods[prec], target, db_dir=db if db.is_dir() else None)
        compile_s[prec] = round(time.perf_counter() - t0, 1)
    x = rng.standard_normal(shape).astype(np.float32)
    outs = {"ort-int8": eonnx.run_onnx(paths["int8"], x), "ort-fp32": eonnx.run_onnx(paths["fp32"], x)}
    vms = {p: relax.VirtualMachine(ex, tvm.cpu()) for p, ex in exes.items()}
    inp = tvm.runtime.tensor(x, tvm.cpu())
    outs.update({f"tvm-{p}": vm["main"](inp).numpy() for p, vm in vms.items()})
    census = {p: {"relax_ops": relax_ops(mods[p]), **kernel_census(exes[p], x)} for p in paths}

    results, commit = [], source_commit(Path(__file__).resolve().parent.parent)
    for n in map(int, args.threads.split(",")):
        etvm.set_num_threads(n)
        sessions = {p: eonnx.session(path, n) for p, path in paths.items()}
        names = ["tvm-fp32", "tvm-int8", "ort-fp32", "ort-int8"]
        fns = [lambda: vms["fp32"]["main"](inp), lambda: vms["int8"]["main"](inp),
               lambda s=sessions["fp32"]: s.run(None, {eonnx.INPUT_NAME: x}),
               lambda s=sessions["int8"]: s.run(None, {eonnx.INPUT_NAME: x})]
        ms = dict(zip(names, bench.interleaved_median_ms(fns, args.runs)))
        results.append({"name": f"end-to-end, {n} thread(s)", "threads": n, "runs": args.runs, "commit": commit,
                        "latency_ms": {f"host-{k}": round(v, 4) for k, v in ms.items()},
                        "int8_speedup": {"tvm": round(ms["tvm-fp32"] / ms["tvm-int8"], 2),
                                         "ort": round(ms["ort-fp32"] / ms["ort-int8"], 2)},
                        "tvm_int8_over_ort_int8": round(ms["tvm-int8"] / ms["ort-int8"], 2)})
    summary = {"name": "summary", "commit": commit,
               "tvm_int8_max_abs_diff_vs_ort_int8": float(np.abs(outs["tvm-int8"] - outs["ort-int8"]).max()),
               "ort_int8_max_abs_diff_vs_fp32": float(np.abs(outs["ort-int8"] - outs["ort-fp32"]).max()),
               "compile_s": compile_s, "census": census}
    doc = {**bench_document("int8", "python " + " ".join(sys.argv),
                            f"{args.model}, input {'x'.join(map(str, shape))}, batch 1; int8 = onnxruntime static "
                            f"QDQ ({scheme.to_dict()['weights']} weights, {scheme.to_dict()['activations']} activations), the file "
                            f"deploy ships; TVM compiles the same file through its Relax ONNX frontend, tuning "
                            f"database {db} applied; the four timed interleaved, median of {args.runs}",
                            results + [summary]),
           "machine": f"{machine()}; LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}",
           "peak": peak, "tuning": tuning}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    e2e = [r for r in doc["results"] if r["name"].startswith("end-to-end")]
    s = next(r for r in doc["results"] if r["name"] == "summary")
    lines = [f"# {doc['benchmark']}\n", f"- command: `{doc['command']}`", f"- machine: {doc['machine']}",
             f"- date: {doc['date']}", f"- protocol: {doc['protocol']}", "",
             ("| threads | TVM fp32 ms | TVM int8 ms | onnxruntime fp32 ms | onnxruntime int8 ms | int8 speedup TVM | "
              "int8 speedup onnxruntime | TVM int8 / onnxruntime int8 |"), "|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        ms = r["latency_ms"]
        lines.append(f"| {r['threads']} | {ms['host-tvm-fp32']:.3f} | {ms['host-tvm-int8']:.3f} | "
                     f"{ms['host-ort-fp32']:.3f} | {ms['host-ort-int8']:.3f} | {r['int8_speedup']['tvm']:.2f}x | "
                     f"{r['int8_speedup']['ort']:.2f}x | {r['tvm_int8_over_ort_int8']:.2f}x |")
    c = s["census"]["int8"]
    lines += ["", (f"TVM's int8 module: Relax operators {c['relax_ops']}; one run calls {c['kernel_calls']} kernels, "
                   f"{c['quantize_calls']} of them with a (de)quantize, {c['conv_calls']} convolutions whose "
                   f"arguments are {', '.join(c['conv_arg_dtypes'])}. TVM int8 output vs onnxruntime int8: max abs "
                   f"difference {s['tvm_int8_max_abs_diff_vs_ort_int8']:.3g} (onnxruntime int8 vs fp32: "
                   f"{s['ort_int8_max_abs_diff_vs_fp32']:.3g}).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
