"""Baselines: every zoo model's MFLOPs and params (the project's convention) next to the paper's figures.

Writes benchmarks/baselines.json + baselines.md (BENCHMARKS.md format).
Run: python tools/bench_baselines.py
Counting needs no data or training; a training part (accuracy, time) adds records to `results` in `main`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from edgecompact.cost.flops import module_flops, module_params
from edgecompact.models import create_model, list_models, model_defaults
from edgecompact.report import bench_document

ROOT = Path(__file__).resolve().parent.parent

# Shafiee et al. 2020, baseline rows of the results tables: (MFLOPs, params), and why our count differs.
PAPER = {
    "resnet32": (144.369, 487_754,
                 ("matches no variant tried; option A (zero-pad shortcut: 464,154 / 137.73) is not traceable by "
                 "torch-pruning, so 1x1 projection + BN (option B); shortcut=conv3x3 is closest in params")),
    "resnet50_cifar": (223.946, 769_476,
                       "6n+2 basic blocks, n = 8, option B; no bottleneck CIFAR ResNet-50 comes near both figures"),
    "resnet50_imagenet64": (2629.21, 25_593_400,
                            "torchvision ResNet-50 without the stem max-pool; params are the standard count"),
    "inception_v3_imagenet64": (7515.7, 22_895_000,
                                ("torchvision InceptionV3 (no aux head), stem adapted to 64x64; params are the "
                                "standard count")),
}
# Variants worth a row: the closest parameter count to the paper's ResNet-32.
VARIANTS = {"resnet32": {"shortcut": "conv3x3"}, "resnet50_cifar": {"shortcut": "conv3x3"}}


def _pct(ours: float, paper: float) -> float:
    return round(100 * (ours - paper) / paper, 2)


def count_record(name: str, **kwargs: str) -> dict:
    d = model_defaults(name)
    model = create_model(name, **kwargs)
    shape = (d.in_channels, d.input_size, d.input_size)
    rec = {"name": "baseline", "model": name, "dataset": d.dataset, "input_shape": list(shape),
           "num_classes": d.num_classes, "mflops": round(module_flops(model, shape) / 1e6, 3),
           "params": module_params(model)}
    if kwargs:
        rec["variant"] = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    if name in PAPER:
        mflops, params, note = PAPER[name]
        rec["paper"] = {"mflops": mflops, "params": params}
        rec["diff_pct"] = {"mflops": _pct(rec["mflops"], mflops), "params": _pct(rec["params"], params)}
        if not kwargs:
            rec["note"] = note
    return rec


def markdown(doc: dict) -> str:
    lines = [f"# {doc['benchmark']}", "", f"`{doc['command']}`  ", (f"{doc['machine']}, {doc['date']}, "
             f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}  "), doc["protocol"], "",
             "| model | variant | dataset | input | MFLOPs | paper MFLOPs | Δ % | params | paper params | Δ % | note |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in doc["results"]:
        paper, diff = r.get("paper", {}), r.get("diff_pct", {})
        cells = [r["model"], r.get("variant", ""), r["dataset"], "x".join(map(str, r["input_shape"][1:])),
                 f"{r['mflops']:,.3f}", f"{paper['mflops']:,}" if paper else "", str(diff.get("mflops", "")),
                 f"{r['params']:,}", f"{paper['params']:,}" if paper else "", str(diff.get("params", "")),
                 r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    results = [count_record(name) for name in list_models()]
    results += [count_record(name, **kw) for name, kw in VARIANTS.items()]
    doc = bench_document("baselines", "python tools/bench_baselines.py",
                         "FLOPs = 2 x MACs of conv and linear layers, batch 1, each model at its default "
                         "setting (classes, input size); params = all learned tensors incl. BN affine", results)
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / "baselines.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "baselines.md").write_text(markdown(doc))
    sys.stdout.write(markdown(doc))


if __name__ == "__main__":
    main()
