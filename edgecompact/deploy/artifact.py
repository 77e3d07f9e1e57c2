"""Deploy artifacts: a model exported for one target and precision, as a directory a board can run.

`export_artifact` writes model.onnx (verified against torch), model.so (TVM, tuned, cross-compiled where the
target needs it), run.py (the board-side runner) and manifest.json (target, input, precision, TVM version,
library sha256, accuracies, measured latencies and the fastest runtime). It does not train or search.
"""

from __future__ import annotations

import json
import platform
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
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import tvm as etvm
from edgecompact.deploy.bench import median_ms
from edgecompact.errors import DeployError
from edgecompact.targets import PRECISIONS, Target

LIBRARY, ONNX_FILE, FP32_ONNX, MANIFEST = "model.so", "model.onnx", "model.fp32.onnx", "manifest.json"


def compile_onnx(path: Path, target: Target, *, tune_trials: int = 0, db_dir: Path | None = None
                 ) -> relax.VMExecutable:
    """ONNX file -> Relax (static input shape from the file) -> compile_relax."""
    name, shape, _ = eonnx.input_spec(path)
    mod = from_onnx(eonnx.load_onnx(path), shape_dict={name: shape})
    return etvm.compile_relax(mod, target, tune_trials=tune_trials, db_dir=db_dir)


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

    fp32_path, onnx_path = out_dir / FP32_ONNX, out_dir / ONNX_FILE
    max_diff = eonnx.export_onnx(model, input_shape, fp32_path)
    if precision == "fp32":
        shutil.move(fp32_path, onnx_path)
        fp32_path = onnx_path
    elif precision == "fp16":
        eonnx.to_fp16(fp32_path, onnx_path)
    else:
        eonnx.quantize_int8(fp32_path, onnx_path, calib)
    in_name, in_shape, in_dtype = eonnx.input_spec(onnx_path)

    t0 = time.perf_counter()
    db_dir = Path(db_dir) if db_dir is not None else (etvm.default_db_dir(target) if tune_trials else None)
    tuning: dict[str, Any] = {"trials_per_task": tune_trials, "db": str(db_dir) if db_dir else None}
    not_here = etvm.runnable_here(target)
    if tune_trials and not_here:
        tuning["skipped"] = "tuning measures candidates on the device; this target does not run here"
        ex = compile_onnx(onnx_path, target, db_dir=db_dir)
    else:
        if tune_trials:
            mod = from_onnx(eonnx.load_onnx(onnx_path), shape_dict={in_name: in_shape})
            tuning["summary"] = etvm.tune(mod, target, tune_trials, db_dir)
        ex = compile_onnx(onnx_path, target, db_dir=db_dir)
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
        "machine": f"{platform.machine()}, {platform.processor() or platform.node()}",
        "tuning": tuning, "threads": threads,
    }
    x = torch.randn(*in_shape, generator=torch.Generator().manual_seed(1)).numpy().astype(in_dtype)
    ort_sess = eonnx.session(onnx_path, threads)
    ref = ort_sess.run(None, {in_name: x})[0]
    manifest["output"]["shape"] = list(ref.shape)
    accuracy: dict[str, float] = {}
    if eval_data is not None:
        fp32_sess = eonnx.session(fp32_path, threads)
        accuracy["fp32-ort"] = _top1(lambda a: fp32_sess.run(None, {in_name: a})[0], eval_data)
        accuracy[f"{precision}-ort"] = _top1(lambda a: ort_sess.run(None, {in_name: a})[0], eval_data)
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
    path.write_text(json.dumps(manifest, indent=1))
    return path
