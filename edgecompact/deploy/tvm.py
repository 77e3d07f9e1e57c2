"""TVM side of deploy: a Target as a TVM target, the one compile path deploy ships, and timing.

`compile_tuned` (and `compile_relax`, its executable) is the only place a Relax module becomes an executable (profiling uses it too), so a layer
is measured exactly as it is shipped. MetaSchedule tuning runs in a subprocess with torch hidden (see
edgecompact.deploy.tune); this module must not tune in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from edgecompact.cpu import host_cpu
from edgecompact.errors import DeployError, StorageError
from edgecompact.storage import cache_root, exclusive, write_text_atomic
from edgecompact.targets import Target

GPU_KINDS = ("opencl", "cuda", "vulkan", "metal", "rocm")
PROGRESS = "edgecompact-tune: "  # marks the tuning process's progress lines among MetaSchedule's logs


def _resolve(spec: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(spec, dict) and spec.get("mcpu") == "native":
        from tvm.target import codegen

        spec = {**spec, "mcpu": str(codegen.llvm_get_system_cpu())}
    return spec


def tvm_target(target: Target) -> tvm.target.Target:
    """The TVM target of `target`, with its host attached and mcpu "native" resolved to this CPU's name."""
    spec = _resolve(target.tvm_target)
    try:
        tgt = tvm.target.Target(spec)
        if target.host_target is not None:
            return tvm.target.Target(spec, host=_resolve(target.host_target))
    except (ValueError, RuntimeError, tvm.TVMError) as e:
        raise DeployError(f"{target.source or target.name}: invalid tvm_target/host_target: {e}") from None
    if tgt.host is None and tgt.kind.name == "llvm":
        tgt = tvm.target.Target(spec, host=spec)
    return tgt


def is_gpu(tgt: tvm.target.Target) -> bool:
    return tgt.kind.name in GPU_KINDS


def _tunes_this_cpu(target: Target) -> bool:
    """The target's code is generated for the CPU running this process (mcpu "native"): its records are measured
    here and belong to this CPU's model and ISA."""
    return isinstance(target.tvm_target, dict) and target.tvm_target.get("mcpu") == "native"


def db_identity(target: Target) -> dict[str, Any]:
    """What a tuning database's records belong to: this CPU (model and ISA, `cpu.Cpu.key`) for a target compiled
    for it, else the TVM target itself (a board's CPU is named in it)."""
    tgt = tvm_target(target)
    ident: dict[str, Any] = {"target": target.name, "llvm_cpu": str((tgt.host or tgt).attrs.get("mcpu", "generic"))}
    if _tunes_this_cpu(target):
        cpu = host_cpu()
        ident.update(cpu=cpu.key, cpu_describe=cpu.describe())
    else:
        ident["tvm_target"] = str(tgt)
    return ident


def default_db_dir(target: Target) -> Path:
    """The per-target tuning database, shared across models: keyed by target name and LLVM's CPU name, and, for a
    target compiled for this CPU, by its model and ISA (two CPUs under one LLVM name differ in their flags)."""
    ident = db_identity(target)
    name = f"{target.name}-{ident['llvm_cpu']}" + (f"-{ident['cpu']}" if "cpu" in ident else "")
    return cache_root() / "tuning" / name


DB_STAMP = "cpu.json"  # in a tuning database: db_identity of the machine and target it was tuned for


def check_db(db_dir: Path, target: Target) -> None:
    """Refuse, in one line, a tuning database tuned for another CPU (or unstamped): never reused silently."""
    db_dir = Path(db_dir)
    has_records = (db_dir / "database_workload.json").is_file()
    stamp_path = db_dir / DB_STAMP
    if not stamp_path.is_file():
        if has_records:
            raise DeployError(f"{db_dir}: tuning database without {DB_STAMP} (no record of the CPU it was tuned "
                              "on): tune into a new directory, or remove this one")
        return
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        raise DeployError(f"{stamp_path}: not readable JSON; remove the tuning database or give another") from None
    ident = db_identity(target)
    key = "cpu" if "cpu" in ident else "tvm_target"
    if stamp.get(key) != ident[key]:
        was = stamp.get("cpu_describe") or stamp.get(key)
        now = ident.get("cpu_describe") or ident[key]
        raise DeployError(f"{db_dir}: tuning database of another CPU or target ({was}); this is {now}: give "
                          "another --tuning-db or remove it")


def _stamp_db(db_dir: Path, target: Target) -> None:
    if not (Path(db_dir) / DB_STAMP).is_file():
        write_text_atomic(Path(db_dir) / DB_STAMP, json.dumps(db_identity(target), indent=1) + "\n")


def _prepare(mod: tvm.IRModule, tgt: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse: the module whose fused TIR functions are the tuning tasks and database keys. On a CPU
    the weights (constants) are marked layout-free, so that a tuned schedule may store them in the layout its
    loops read (MetaSchedule's layout rewrite; `_prepack` then computes that layout once, at compile time)."""
    with tgt:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
            *([] if is_gpu(tgt) else [relax.transform.AttachAttrLayoutFreeBuffers()]),
        ])(mod)


def _prepack(mod: tvm.IRModule, tgt: tvm.target.Target) -> tvm.IRModule:
    """Weight prepacking (TVM's `static_shape_tuning_pipeline(cpu_weight_prepack=True)`, after the database is
    applied): the weight layout transforms a tuned schedule asked for are split out and, the weights being
    constants, folded into prepacked constants. `main` still takes the input alone: the artifact hides the
    transform-params step, so run.py and bench call it as before."""
    if is_gpu(tgt):
        return mod
    with tgt:
        return tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
        ])(mod)


def tune(mod: tvm.IRModule, target: Target, trials_per_task: int, db_dir: Path, *, chunk: int | None = None,
         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """MetaSchedule-tune every task of `mod` up to `trials_per_task` trials in all (subprocess, torch hidden;
    resumable in steps of `chunk` trials, see edgecompact.deploy.tune). `progress` gets one line per step.
    Returns the run's summary."""
    tgt = tvm_target(target)
    return _tune(_prepare(mod, tgt), target, tgt, trials_per_task, db_dir, chunk=chunk, progress=progress)


def _tune(prepared: tvm.IRModule, target: Target, tgt: tvm.target.Target, trials_per_task: int,
          db_dir: Path, *, chunk: int | None = None, progress: Callable[[str], None] | None = None
          ) -> dict[str, Any]:
    db_dir = Path(db_dir)
    check_db(db_dir, target)
    db_dir.mkdir(parents=True, exist_ok=True)
    # one writer per database: two tuners appending to its JSON files would interleave their lines
    with exclusive(db_dir, f"tuning database {db_dir}"):
        _stamp_db(db_dir, target)
        with tempfile.TemporaryDirectory(dir=db_dir) as tmp:
            mod_path, summary_path = Path(tmp) / "mod.json", Path(tmp) / "summary.json"
            mod_path.write_text(tvm.ir.save_json(prepared))
            cmd = [sys.executable, "-m", "edgecompact.deploy.tune", "--mod", str(mod_path),
                   "--target", str(tgt), "--db", str(db_dir),
                   "--trials-per-task", str(trials_per_task), "--summary", str(summary_path),
                   "--progress-prefix", PROGRESS]
            if chunk:
                cmd += ["--chunk", str(chunk)]
            env = {**os.environ, "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1"}
            with tempfile.TemporaryFile("w+") as err, \
                    subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
                try:
                    for line in proc.stdout:  # MetaSchedule's own log lines are in db_dir/logs too
                        if progress is not None and line.startswith(PROGRESS):
                            progress(line[len(PROGRESS):].rstrip())
                    proc.wait()
                finally:  # interrupted (SIGTERM, Ctrl-C): the tuner stops too; its ledger keeps finished steps
                    if proc.poll() is None:
                        proc.terminate()
                        proc.wait()
                if proc.returncode != 0:
                    err.seek(0)
                    stderr = err.read()
                    tail = stderr.strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"MetaSchedule tuning failed (exit {proc.returncode}): {tail[0]}\n"
                                       f"{stderr[-4000:]}")
            return json.loads(summary_path.read_text())


def compile_relax(mod: tvm.IRModule, target: Target, *, tune_trials: int = 0,
                  db_dir: Path | None = None) -> relax.VMExecutable:
    """Build `mod` for `target`: legalize + fuse, apply tuning records, relax.build (`compile_tuned`'s
    executable)."""
    return compile_tuned(mod, target, tune_trials=tune_trials, db_dir=db_dir)[0]


def compile_tuned(mod: tvm.IRModule, target: Target, *, tune_trials: int = 0,
                  db_dir: Path | None = None) -> tuple[relax.VMExecutable, dict[str, Any] | None]:
    """(executable, tuning summary or None): `mod` legalized and fused once, tuned, built for `target`.

    tune_trials > 0 first tunes every task not yet tuned with that many trials per task into the per-target
    database `db_dir` (default: `default_db_dir(target)`), so a layer shape shared with an earlier model costs
    nothing. tune_trials == 0 with a `db_dir` applies the records already there. GPU targets get the dlight
    default schedules for whatever the database does not cover.
    """
    tgt = tvm_target(target)
    prepared = _prepare(mod, tgt)
    summary = None
    if tune_trials > 0:
        db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
        summary = _tune(prepared, target, tgt, tune_trials, db_dir)
    if db_dir is not None and (Path(db_dir) / "database_workload.json").is_file():
        check_db(db_dir, target)
        from tvm.s_tir import meta_schedule as ms

        database = ms.database.JSONDatabase(work_dir=str(db_dir))
        with tgt, database:
            prepared = relax.transform.MetaScheduleApplyDatabase()(prepared)
    if is_gpu(tgt):
        import tvm.s_tir.dlight as dl

        with tgt:
            prepared = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                               dl.gpu.GeneralReduction(), dl.gpu.Fallback())(prepared)
    return relax.build(_prepack(prepared, tgt), target=tgt), summary


def set_num_threads(n: int) -> None:
    """Size TVM's CPU thread pool (the runtime's own pool, not torch's or onnxruntime's), threads not pinned.

    TVM_BIND_THREADS=0 unless the caller set it: with binding, config_threadpool pins the calling thread to
    core 0 (n=1), and every process started afterwards inherits that mask, the tuning subprocess and all its
    builder/runner workers included. On a 2-core machine shared with other jobs that put tuning on one core
    and doubled TVM's latency (ResNet-20, 1 thread, same process, interleaved: 7.5 ms pinned, 3.6 ms not).
    """
    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("TVM_BIND_THREADS", "0")  # read by config_threadpool below
    tvm.get_global_func("runtime.config_threadpool")(1, n)  # mode 1: big cores, n threads


def time_executable(ex: Any, args: list[np.ndarray], *, number: int, repeat: int,
                    device: Any = None) -> list[float]:
    """Milliseconds per run of `main`, `repeat` values each averaged over `number` runs, after one warm-up.

    `ex` is a VMExecutable or a loaded runtime module (local, or from an RPC session with `device` remote).
    """
    dev = device if device is not None else tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    inputs = [tvm.runtime.tensor(a, dev) for a in args]
    vm["main"](*inputs)
    result = vm.time_evaluator("main", dev, number=number, repeat=repeat)(*inputs)
    return [float(r) * 1e3 for r in result.results]


def export_library(ex: relax.VMExecutable, path: Path, target: Target) -> Path:
    """Write the shared library, cross-compiled with the target's compiler when it has one."""
    path = Path(path)
    if target.cross_compiler and shutil.which(target.cross_compiler) is None:
        raise DeployError(f"{target.source or target.name}: cross_compiler '{target.cross_compiler}' not found "
                          "(Debian: apt-get install gcc-aarch64-linux-gnu)")
    try:
        if target.cross_compiler:
            ex.export_library(str(path), cc=target.cross_compiler)
        else:
            ex.export_library(str(path))
    except RuntimeError as e:  # the linker's own words for a full disk (it is a child process: no errno here)
        full = [why for why in LINKER_FULL_DISK if why.lower() in str(e).lower()]
        if not full:
            raise
        raise StorageError(f"cannot write {path}: {full[0].lower()} (the linker stopped); free some space and "
                           "re-run the same command") from None
    return path


LINKER_FULL_DISK = ("No space left on device", "File size limit exceeded", "Disk quota exceeded")


def runnable_here(target: Target) -> str | None:
    """None when this process can run the target's library, else one line saying what is missing."""
    tgt = tvm_target(target)
    if is_gpu(tgt) and not tvm.runtime.enabled(tgt.kind.name):
        return (f"{target.name}: built, not run here: this TVM has no {tgt.kind.name} runtime "
                f"(tvm.runtime.enabled('{tgt.kind.name}') is False); run it on the board or over RPC")
    if not target.runnable_here:
        return f"{target.name}: built, not run here: cross-compiled for another machine; run it on the board or over RPC"
    return None
