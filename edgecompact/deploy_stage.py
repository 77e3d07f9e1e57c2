"""The deploy step of a search run: export baseline and compact model for the target, measure both in one process.

Glue only: exporting, compiling and timing live in edgecompact.deploy. The measured latencies are merged into the
run's records (keys `<target>-tvm`, `<target>-ort`, `<target>-torch`), next to the predicted ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from edgecompact.data import DataSplits
from edgecompact.storage import write_text_atomic
from edgecompact.targets import Target

BENCH_RUNS = 200  # batch-1 runs per runtime and model; baseline and compact are timed back to back
EVAL_IMAGES = 500  # deployed-runtime accuracy is measured on this many test images (batch 1 through each runtime)


def _export(model: nn.Module, data: DataSplits, target: Target, out: Path, precision: str,
            tune_trials: int) -> Path:
    from edgecompact.deploy.artifact import export_artifact
    from edgecompact.precision import calibration_inputs

    if (out / "manifest.json").is_file():
        return out
    test = data.report_split
    x, y = test.tensors
    calib = calibration_inputs(data.train).numpy() if precision == "int8" else None
    export_artifact(model.eval(), (1, data.in_channels, data.input_size, data.input_size), target, out,
                    precision=precision, tune_trials=tune_trials, calib=calib,
                    eval_data=(x[:EVAL_IMAGES].numpy(), y[:EVAL_IMAGES].numpy()), overwrite=True)
    return out


def deploy_run(run_dir: Path, records: list[dict], baseline: nn.Module, compact: nn.Module, data: DataSplits,
               target: Target, *, precision: str = "fp32", tune_trials: int = 0, baseline_dir: Path | None = None,
               rpc_tracker: str | None = None, rpc_key: str | None = None, log=print) -> dict:
    """Export both models under run_dir/deploy/<target>/ (the baseline's artifact may be shared through
    `baseline_dir`), time them in this process where the target runs here (or on the board behind the RPC
    tracker `rpc_tracker`, HOST:PORT, under `rpc_key`), and merge the latencies into
    `records` (baseline first, compact second), with the compact's speedup per runtime measured against the
    baseline timed in the same process. Returns the bench document written to bench.json."""
    from edgecompact.deploy.bench import bench_artifacts

    root = Path(run_dir) / "deploy" / target.name
    base_art = Path(baseline_dir) if baseline_dir is not None else root / "baseline"
    log(f"deploy: exporting the baseline and the compact model for {target.name} ({precision}, "
        f"{'tuned ' + str(tune_trials) + ' trials/task' if tune_trials else 'untuned TVM'})")
    _export(baseline, data, target, base_art, precision, tune_trials)
    _export(compact, data, target, root / "compact", precision, tune_trials)
    arts = [base_art, root / "compact"]
    doc = bench_artifacts(arts, runs=BENCH_RUNS, models={str(base_art): baseline, str(root / "compact"): compact},
                          rpc_tracker=rpc_tracker, rpc_key=rpc_key, write=True)
    for rec, res in zip(records, doc["results"]):
        rec.setdefault("latency_ms", {}).update(res.get("latency_ms", {}))
        manifest = json.loads((Path(res["artifact"]) / "manifest.json").read_text())
        if "accuracy_top1" in manifest:
            rec["deployed_top1"] = manifest["accuracy_top1"]
        if "best_runtime" in manifest:
            rec["best_runtime"] = manifest["best_runtime"]
        if res.get("skipped"):
            rec["measured"] = res["skipped"]
    base_res, comp_res = doc["results"]
    if comp_res.get("paired"):  # timed here as a pair: each model once per runtime, ratios from one process
        records[1]["measured_speedup"] = dict(comp_res["measured_speedup"])
    else:  # a board over RPC: the two timed one after the other, said so beside the ratio
        base_lat, comp_lat = base_res["latency_ms"], comp_res["latency_ms"]
        records[1]["measured_speedup"] = {k: round(base_lat[k] / comp_lat[k], 3) for k in comp_lat
                                          if k in base_lat and comp_lat[k] > 0}
        if records[1]["measured_speedup"]:
            records[1]["speedup_timing"] = "unpaired: baseline and compact timed one after the other"
    write_text_atomic(root / "bench.json", json.dumps(doc, indent=1))
    return doc
