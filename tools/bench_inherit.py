"""Inherit-path study: the fine-tune learning rate and length of `--final inherit`, chosen on the validation split.

For each seed, methods start from the baseline checkpoint tools/bench_methods.py trained for that seed (the same
protocol's `runs/bench-methods/<protocol>/s<seed>/baseline.pt`; trained here if missing). Each (lr, epochs) pair
fine-tunes every listed method's found network from its inherited weights; the row reports validation top-1 (what
the choice is made on) and test top-1 (reported only). Writes benchmarks/inherit.json + .md, resumable per row.
Run: python tools/bench_inherit.py --seeds 0 --lrs 0.01 0.02 0.05 --methods uniform group-lasso
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from edgecompact.data import load_dataset
from edgecompact.errors import UserError
from edgecompact.methods import run_method
from edgecompact.models import create_model
from edgecompact.pipeline import build_context
from edgecompact.report import bench_document, source_commit
from edgecompact.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
PROTO = {"dataset": "fashion-mnist", "model": "resnet20", "input_size": 28, "limit": 8000, "epochs": 8,
         "search_epochs": 2, "finetune_epochs": 3}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    p.add_argument("--methods", nargs="+", default=["uniform", "group-lasso"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "inherit.json")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where bench_methods keeps its checkpoints")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python tools/bench_inherit.py " + " ".join(argv or sys.argv[1:])
    proto = (f"{PROTO['model']}, {PROTO['dataset']} at {PROTO['input_size']}, {PROTO['limit']} train+val images, "
             f"baseline {PROTO['epochs']} epochs (tools/bench_methods.py's checkpoint), search "
             f"{PROTO['search_epochs']} epochs, inherit fine-tune {PROTO['finetune_epochs']} epochs (uniform: "
             f"+{PROTO['search_epochs']}) at each lr, cosine; budget flops 1/3x; choose on val, test reported only")
    rows = json.loads(a.out.read_text())["results"] if a.out.is_file() else []
    slug = f"{PROTO['dataset']}-{PROTO['model']}-{PROTO['input_size']}-{PROTO['limit']}-e{PROTO['epochs']}"
    for seed in a.seeds:
        work = a.runs / "bench-methods" / slug / f"s{seed}"
        data = load_dataset(PROTO["dataset"], input_size=PROTO["input_size"], seed=seed, limit=PROTO["limit"])
        torch.manual_seed(seed)
        base = create_model(PROTO["model"], num_classes=data.num_classes, in_channels=data.in_channels,
                            input_size=data.input_size)
        train(base, data.train, TrainConfig(epochs=PROTO["epochs"], seed=seed), val_set=data.val,
              checkpoint=work / "baseline.pt", desc="baseline")
        base.eval()
        for lr in a.lrs:
            ctx = build_context(base, data, "1/3x", model_name=PROTO["model"], seed=seed,
                                finetune=TrainConfig(epochs=PROTO["finetune_epochs"], lr=lr, seed=seed),
                                search_epochs=PROTO["search_epochs"], final="inherit")
            for name in a.methods:
                if any(r["name"] == name and r["lr"] == lr and r["seed"] == seed for r in rows):
                    continue
                res = run_method(name, replace(ctx, run_dir=work / "inherit-study" / f"lr{lr:g}" / name))
                rows.append({"name": name, "seed": seed, "lr": lr, "top1_val": round(evaluate(res.model, data.val), 2),
                             "top1": res.metrics["top1"], "mflops": res.metrics["mflops"],
                             "commit": source_commit(ROOT)})
                write(a.out, command, proto, rows)
                print(rows[-1], flush=True)


def write(out: Path, command: str, proto: str, rows: list[dict]) -> None:
    doc = bench_document("inherit", command, proto, rows)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# inherit", "", f"- command: `{command}`", f"- machine: {doc['machine']}", f"- date: {doc['date']}",
             f"- protocol: {proto}", "", "| method | lr | seeds | val top-1 % (mean) | test top-1 % (mean) |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        for lr in sorted({r["lr"] for r in rows if r["name"] == name}):
            sel = [r for r in rows if r["name"] == name and r["lr"] == lr]
            lines.append(f"| {name} | {lr:g} | {','.join(str(r['seed']) for r in sel)} | "
                         f"{statistics.fmean(r['top1_val'] for r in sel):.2f} | "
                         f"{statistics.fmean(r['top1'] for r in sel):.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
