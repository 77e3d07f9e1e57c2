"""Baselines: every zoo model's MFLOPs and params (the project's convention) next to the paper's figures.

Writes benchmarks/baselines.json + baselines.md (BENCHMARKS.md format).
Run: python tools/bench_baselines.py [--train]
Counting needs no data or training. `--train` also trains ResNet-32 on digits and on a Fashion-MNIST subset
(CPU-sized schedules, stated in the output) and records top-1 and training time; trained records are kept in the
JSON, so a run without --train does not drop them.
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
    for r in [r for r in doc["results"] if "top1" not in r]:
        paper, diff = r.get("paper", {}), r.get("diff_pct", {})
        cells = [r["model"], r.get("variant", ""), r["dataset"], "x".join(map(str, r["input_shape"][1:])),
                 f"{r['mflops']:,.3f}", f"{paper['mflops']:,}" if paper else "", str(diff.get("mflops", "")),
                 f"{r['params']:,}", f"{paper['params']:,}" if paper else "", str(diff.get("params", "")),
                 r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    trained = [r for r in doc["results"] if "top1" in r]
    if trained:
        lines += ["", "| model | dataset | input | train images | epochs | top-1 % | train s | s/epoch |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in trained:
            lines.append(f"| {r['model']} | {r['dataset']} | {'x'.join(map(str, r['input_shape'][1:]))} | "
                         f"{r['train_images']:,} | {r['epochs']} | {r['top1']} | {r['wall_s']} | "
                         f"{r['seconds_per_epoch']} |")
    return "\n".join(lines) + "\n"


# CPU-sized training protocols for the accuracy/time records (dataset spec, input size, train images, epochs).
TRAINING = [("digits", 32, None, 15), ("fashion-mnist", 28, 12000, 6)]


def train_record(model_name: str, data_spec: str, size: int, limit: int | None, epochs: int) -> dict:
    import time

    from edgecompact.data import load_dataset
    from edgecompact.train import TrainConfig, evaluate, train

    data = load_dataset(data_spec, input_size=size, limit=limit)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels, input_size=size)
    t0 = time.perf_counter()
    train(model, data.train, TrainConfig(epochs=epochs, lr=0.05, batch_size=128, augment=True), desc=data_spec)
    wall = time.perf_counter() - t0
    shape = (data.in_channels, size, size)
    return {"name": "baseline", "model": model_name, "dataset": data.name, "input_shape": list(shape),
            "num_classes": data.num_classes, "mflops": round(module_flops(model, shape) / 1e6, 3),
            "params": module_params(model), "top1": round(evaluate(model, data.test), 2), "wall_s": round(wall, 1),
            "train_images": len(data.train), "epochs": epochs,
            "seconds_per_epoch": round(wall / epochs, 1)}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="also train ResNet-32 on digits and Fashion-MNIST")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ROOT / "benchmarks"
    results = [count_record(name) for name in list_models()]
    results += [count_record(name, **kw) for name, kw in VARIANTS.items()]
    if args.train:
        results += [train_record("resnet32", *proto) for proto in TRAINING]
    elif (out / "baselines.json").is_file():
        old = json.loads((out / "baselines.json").read_text())["results"]
        results += [r for r in old if "top1" in r]
    doc = bench_document("baselines", "python tools/bench_baselines.py" + (" --train" if args.train else ""),
                         "FLOPs = 2 x MACs of conv and linear layers, batch 1, each model at its default "
                         "setting (classes, input size); params = all learned tensors incl. BN affine. Training "
                         "(--train): ResNet-32, SGD lr 0.05 cosine, batch 128, random crops, 1 thread; digits "
                         "32x32 15 epochs, Fashion-MNIST 28x28 12k-image subset 6 epochs", results)
    out.mkdir(exist_ok=True)
    (out / "baselines.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "baselines.md").write_text(markdown(doc))
    sys.stdout.write(markdown(doc))


if __name__ == "__main__":
    main()
