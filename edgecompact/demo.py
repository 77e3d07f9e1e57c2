"""`edgecompact demo`: the whole pipeline on the embedded default (digits), in minutes on two CPU cores.

One baseline (ResNet-20 on digits at 16x16), every method and both controls at 1/3 of its FLOPs on the host
target, each exported and compiled, baseline and compact measured in one process, and one report with plots.
Re-running resumes: finished methods are not redone.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from edgecompact.pipeline import SearchSpec, prepare_run_dir, run_search, train_baseline

METHODS = ["uniform", "random", "group-lasso", "variational-dropout", "morphnet", "gensynth"]


def run_demo(out: Path, *, methods: list[str] | None = None, deploy: bool = True, tune_trials: int = 0,
             epochs: int = 8, log=print) -> Path:
    """Run the demo into `out`; returns the path of the combined report.md."""
    from edgecompact.data import load_dataset
    from edgecompact.methods import list_methods
    from edgecompact.pipeline import load_baseline
    from edgecompact.report import bench_document, load_records, plot, write_bench

    methods = methods or [m for m in METHODS if m in list_methods()]
    out = Path(out)
    spec = SearchSpec(model="resnet20", data="digits", method="baseline", budget="1/3x", input_size=16,
                      epochs=epochs, search_epochs=3, finetune_epochs=4, batch_size=64, lr=0.05, target="host",
                      tune_trials=tune_trials)
    base_dir = out / "baseline"
    prepare_run_dir(base_dir, spec, force=False)
    data = load_dataset(spec.data, input_size=spec.input_size, seed=spec.seed)
    from edgecompact.train import TrainConfig

    top1 = train_baseline(load_baseline(spec, data), data, TrainConfig(epochs=spec.epochs, lr=spec.lr,
                          batch_size=spec.batch_size, seed=spec.seed), base_dir, log)
    log(f"baseline ResNet-20 on digits: top-1 {top1:.2f}%")
    run_dirs = []
    for m in methods:
        run_dir = out / m
        mspec = replace(spec, method=m)
        prepare_run_dir(run_dir, mspec, force=False)
        if not (run_dir / "baseline.pt").is_file():
            shutil.copy(base_dir / "baseline.pt", run_dir / "baseline.pt")
        log(f"--- {m} ---")
        run_search(mspec, run_dir, deploy=deploy, baseline_artifact=base_dir / "deploy" / "host", log=log)
        run_dirs.append(run_dir)
    records = load_records(run_dirs)
    doc = bench_document("demo", "edgecompact demo", "ResNet-20, digits 16x16, 8 baseline + 3 search + 4 "
                         "fine-tune epochs, every method at 1/3 FLOPs, host target", records)
    write_bench(out / "report.json", doc)
    plot(records, out)
    return out / "report.md"
