"""MetaSchedule tuning process: `python -m edgecompact.deploy.tune` (started by deploy.tvm.tune, not by users).

Runs with torch hidden and a cheap `inspect.stack`, in this process and in every builder/runner worker:
with torch importable, each worker's TVMScript import takes minutes and LocalBuilder silently times out
(../shared/notes/tvm.md, sections 2 and 7). Only conv/matmul tasks are tuned.

Tuning is incremental and resumable: the ledger (`tuned_tasks.json`) holds, per workload, the trials it has
been given in all. A task short of `--trials-per-task` is tuned one chunk (at most `--chunk` trials, one search
round) at a time, and the ledger is written after every chunk, so a killed run loses one chunk at most and the
next run goes on from there. Each chunk's evolutionary search starts from the best records the database already
holds for that workload, so chunks continue one search rather than restart it. Shared layer shapes are tuned
once per database. One progress line per chunk goes to stdout, marked by `--progress-prefix`.
"""

from __future__ import annotations

import inspect
import linecache
import sys

from edgecompact.run import hide_torch


def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    frame, out = sys._getframe(1), []
    while frame is not None:
        fn, ln = frame.f_code.co_filename, frame.f_lineno
        line = linecache.getline(fn, ln) if context else ""
        out.append(inspect.FrameInfo(frame, fn, ln, frame.f_code.co_name, [line] if line else None,
                                     0 if line else None))
        frame = frame.f_back
    return out


def init_worker() -> None:
    """Initializer of the builder/runner worker processes (imported there by module name)."""
    hide_torch()
    inspect.stack = _fast_stack


init_worker()

import argparse
import json
import math
import time
from itertools import accumulate
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from edgecompact.storage import write_text_atomic

HEAVY_OPS = ("conv", "matmul", "dense")
LEDGER = "tuned_tasks.json"  # {structural hash of a workload: trials it has been given in all}
# Candidates measured per search round of a task. Each round costs a fixed ~80-120 s here (evolutionary
# search over 512 candidates, plus a fresh builder pool whose workers import TVM) against ~1 s per extra
# candidate built and run, so a few large rounds reach more trials per task than many 16-candidate rounds.
TRIALS_PER_ROUND = 64


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m edgecompact.deploy.tune")
    ap.add_argument("--mod", required=True, help="IRModule JSON (tvm.ir.save_json), already legalized and fused")
    ap.add_argument("--target", required=True, help="TVM target as JSON")
    ap.add_argument("--db", required=True, help="database directory (JSONDatabase work_dir)")
    ap.add_argument("--trials-per-task", type=int, required=True, help="trials every task gets in all")
    ap.add_argument("--chunk", type=int, default=TRIALS_PER_ROUND, help="trials per resumable step")
    ap.add_argument("--summary", required=True)
    ap.add_argument("--progress-prefix", default="", help="starts each progress line (TVM logs to stdout too)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    mod = tvm.ir.load_json(Path(args.mod).read_text())
    target = tvm.target.Target(json.loads(args.target))
    db_dir = Path(args.db)
    ledger_path = db_dir / LEDGER
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}

    # Only compute-heavy tasks are worth trials; reshapes/elementwise ops exhaust their tiny search space
    # and then stall the task scheduler, and keep their default schedule.
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if any(k in t.task_name for k in HEAVY_OPS)]
    keys = [str(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
    todo = [i for i, k in enumerate(keys) if ledger.get(k, 0) < args.trials_per_task]
    summary = {"tasks": len(extracted), "tuned_tasks": len(todo), "reused_tasks": len(extracted) - len(todo),
               "trials_per_task": args.trials_per_task, "trials": 0, "tuning_s": 0.0}
    database = ms.database.JSONDatabase(work_dir=str(db_dir)) if todo else None
    for n, i in enumerate(todo, 1):
        task, key = extracted[i], keys[i]
        while (done := ledger.get(key, 0)) < args.trials_per_task:
            step = min(args.chunk, args.trials_per_task - done)
            t1, before = time.perf_counter(), len(database)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(db_dir))
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(db_dir),
                max_trials_global=step, max_trials_per_task=step, num_trials_per_iter=step,
                builder=ms.builder.LocalBuilder(max_workers=2, timeout_sec=300, initializer=init_worker),
                runner=ms.runner.LocalRunner(timeout_sec=120, initializer=init_worker),
                database=database,
            )
            summary["trials"] += len(database) - before
            ledger[key] = done + step
            write_text_atomic(ledger_path, json.dumps(ledger, indent=1, sort_keys=True))
            print(f"{args.progress_prefix}task {n}/{len(todo)} {task.task_name}: {ledger[key]}/{args.trials_per_task} trials "
                  f"(+{len(database) - before} records in {time.perf_counter() - t1:.0f} s)", flush=True)
    summary["tuning_s"] = round(time.perf_counter() - t0, 1)
    summary["convergence"] = convergence(db_dir, {k: t.task_name for k, t in zip(keys, extracted)})
    Path(args.summary).write_text(json.dumps(summary))


def convergence(db_dir: Path, names: dict[str, str], marks: tuple[int, ...] = (32, 64, 128, 256, 512)) -> list[dict]:
    """Per task of `names` ({workload key: task name}): its records in the database and the best candidate's mean
    time (us, the tuner's own measurement) among its first n records, n in `marks`: where the search stopped finding
    faster schedules. Records are read in the order the database appended them; failed builds have no time."""
    index = {}
    with open(db_dir / "database_workload.json") as f:
        for i, line in enumerate(f):
            index[i] = json.loads(line)[0]
    times: dict[str, list[float]] = {}
    with open(db_dir / "database_tuning_record.json") as f:
        for line in f:
            i, record = json.loads(line)
            run_secs = record[1] or []
            times.setdefault(index[i], []).append(sum(run_secs) / len(run_secs) if run_secs else math.inf)
    out = []
    for key, name in names.items():
        ts = times.get(key, [])
        so_far = list(accumulate(ts, min))  # the best of the first i + 1 records
        ends = [n for n in marks if n <= len(ts)] + ([len(ts)] if ts and len(ts) not in marks else [])
        best = {str(n): round(so_far[n - 1] * 1e6, 1) for n in ends if so_far[n - 1] < math.inf}
        out.append({"task": name, "key": key, "records": len(ts), "best_us": best})
    return out

if __name__ == "__main__":
    main()
