"""Deploy artifacts: a model exported for one target and precision, as a directory a board can run.

`export_artifact` writes model.onnx (verified against torch), model.so (TVM, tuned, cross-compiled where the
target needs it), run.py (the board-side runner) and manifest.json (target, input, precision, TVM version,
library sha256, machine and CPU facts, int8 settings, accuracies measured by the runtimes themselves, measured
latencies and the fastest runtime). It does not train or search.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from edgecompact import __version__, run
from edgecompact.cpu import Int8Scheme, host_cpu, int8_scheme
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import tvm as etvm
from edgecompact.deploy.bench import median_ms
from edgecompact.errors import DeployError
from edgecompact.report import machine
from edgecompact.storage import write_text_atomic
from edgecompact.targets import PRECISIONS, Target

LIBRARY, ONNX_FILE, MANIFEST = "model.so", "model.onnx", "manifest.json"  # + model.fp32.onnx beside int8/fp16


def int8_scheme_for(target: Target) -> Int8Scheme:
    """The int8 settings of a deployment to `target`: this CPU's where the target is this machine; full-range
    weights elsewhere (the boards here are Arm, whose int8 kernels widen to int32 without pair saturation)."""
    if target.runnable_here:
        return int8_scheme()
    return Int8Scheme(False, f"{target.name}: not this machine; Arm int8 kernels do not saturate")


def relax_module(path: Path) -> tuple[tvm.IRModule, tuple[str, list[int], str]]:
    """ONNX file, parsed once -> (Relax module with the file's static input shape, its input spec)."""
    model = eonnx.load_onnx(path)
    spec = eonnx.input_spec(path, model)
    return from_onnx(model, shape_dict={spec[0]: spec[1]}), spec


def compile_onnx(path: Path, target: Target, *, tune_trials: int = 0, db_dir: Path | None = None
                 ) -> relax.VMExecutable:
    """ONNX file -> Relax (static input shape from the file) -> compile_relax."""
    return etvm.compile_relax(relax_module(path)[0], target, tune_trials=tune_trials, db_dir=db_dir)


def _top1(predict: Any, data: tuple[np.ndarray, np.ndarray]) -> float:
    xs, ys = data
    hits = sum(int(np.argmax(predict(x[None]))) == int(y) for x, y in zip(xs, ys, strict=True))
    return round(100.0 * hits / len(ys), 2)


def export_artifact(model: nn.Module, input_shape: tuple[int, ...], target: Target, out_dir: Path, *,
                    precision: str = "fp32", tune_trials: int = 0, db_dir: Path | None = None,
                    calib: np.ndarray | None = None, eval_data: tuple[np.ndarray, np.ndarray] | None = None,
                    threads: int = 1, runs: int = 50, overwrite: bool = False) -> Path:
    """Export `model` for `target` at `precision` into `out_dir`; returns the manifest path.

    int8 needs `calib` (training inputs, N x C x H x W). With `eval_data` (inputs, labels) the top-1 of the
    fp32 ONNX model and of every runnable runtime at `precision` is recorded. Where the target runs here,
    TVM and onnxruntime are timed (batch 1, median of `runs`, `threads` threads each) and the faster is
    recorded as `best_runtime`.
    """
    if precision not in PRECISIONS:
        raise DeployError(f"--precision {precision}: must be one of {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise DeployError(f"{out_dir}: already holds an artifact (pass overwrite to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    etvm.set_num_threads(threads)

    onnx_path = out_dir / ONNX_FILE
    scheme = int8_scheme_for(target) if precision == "int8" else None
    fp32_path, max_diff = eonnx.ship_onnx(model, input_shape, precision, onnx_path, calib=calib, scheme=scheme)
    t0 = time.perf_counter()  # compile_s: ONNX import, tuning and build
    mod, (in_name, in_shape, in_dtype) = relax_module(onnx_path)
    db_dir = Path(db_dir) if db_dir is not None else (etvm.default_db_dir(target) if tune_trials else None)
    tuning: dict[str, Any] = {"trials_per_task": tune_trials, "db": str(db_dir) if db_dir else None}
    not_here = etvm.runnable_here(target)
    if tune_trials and not_here:
        tuning["skipped"] = "tuning measures candidates on the device; this target does not run here"
    ex, summary = etvm.compile_tuned(mod, target, tune_trials=0 if not_here else tune_trials, db_dir=db_dir)
    if summary is not None:
        tuning["summary"] = summary
    tuning["compile_s"] = round(time.perf_counter() - t0, 1)
    lib = etvm.export_library(ex, out_dir / LIBRARY, target)
    shutil.copy(run.__file__, out_dir / "run.py")

    tgt = etvm.tvm_target(target)
    manifest: dict[str, Any] = {
        "format": 1, "target": target.to_dict(), "tvm_target": json.loads(str(tgt)),
        "device": tgt.kind.name if etvm.is_gpu(tgt) else "cpu", "precision": precision,
        "input": {"name": in_name, "shape": in_shape, "dtype": in_dtype},
        "output": {"name": eonnx.OUTPUT_NAME}, "library": LIBRARY, "sha256": run.sha256(lib), "onnx": ONNX_FILE,
        "onnx_opset": eonnx.OPSET, "onnx_max_abs_diff_vs_torch": max_diff,
        "versions": {"edgecompact": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
                     "onnxruntime": eonnx.ort.__version__, "torch": torch.__version__},
        "machine": machine(), "cpu": host_cpu().to_dict(),
        "tuning": tuning, "threads": threads,
    }
    if scheme is not None:  # the settings the model was quantized with, and whether this CPU's kernels need them
        manifest["int8"] = {**scheme.to_dict(), "ort_u8s8_saturates_here": eonnx.u8s8_saturates()}
    x = torch.randn(*in_shape, generator=torch.Generator().manual_seed(1)).numpy().astype(in_dtype)
    ort_sess = eonnx.session(onnx_path, threads)
    ref = ort_sess.run(None, {in_name: x})[0]
    manifest["output"]["shape"] = list(ref.shape)
    accuracy: dict[str, float] = {}
    if eval_data is not None:
        accuracy["fp32-ort"] = round(eonnx.onnx_top1(fp32_path, *eval_data, threads), 2)
        accuracy[f"{precision}-ort"] = round(eonnx.onnx_top1(onnx_path, *eval_data, threads), 2)
    if not_here:
        manifest["runs_here"] = not_here
        print(not_here)
    else:
        vm = relax.VirtualMachine(ex, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        diff = float(np.abs(got - ref).max())
        manifest["tvm_max_abs_diff_vs_ort"] = diff
        if precision == "fp32" and diff > eonnx.FP32_TOLERANCE:
            raise DeployError(f"{lib}: TVM output differs from onnxruntime by {diff:.3g} (> {eonnx.FP32_TOLERANCE})")
        if eval_data is not None:
            accuracy[f"{precision}-tvm"] = _top1(lambda a: vm["main"](tvm.runtime.tensor(a)).numpy(), eval_data)
        latency = {"tvm": float(np.median(etvm.time_executable(ex, [x], number=1, repeat=runs))),
                   "onnxruntime": median_ms(lambda: ort_sess.run(None, {in_name: x}), runs, warmup=5)}
        best = min(latency, key=latency.get)
        manifest["latency_ms"] = {k: round(v, 4) for k, v in latency.items()}
        manifest["best_runtime"] = best
        manifest["best_speedup_vs_other"] = round(max(latency.values()) / latency[best], 3)
    if accuracy:
        manifest["accuracy_top1"] = accuracy
    path = out_dir / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=1))
    return path
