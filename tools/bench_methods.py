"""Methods benchmark: every registered search method at one budget (default 1/3 FLOPs), same fine-tune budget.

Trains the baseline once (checkpointed under --work-dir, resumable), then runs each requested method with
`run_method` and writes benchmarks/methods.json + .md after EACH method: a killed run keeps the finished ones and
a re-run with the same protocol skips them (a different protocol needs --fresh or another --out).
Run: python tools/bench_methods.py --dataset fashion-mnist --model resnet20 --input-size 28 --limit 6000 \
        --epochs 6 --search-epochs 3 --finetune-epochs 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

from edgecompact.budget import parse_budget
from edgecompact.data import load_dataset
from edgecompact.errors import ConfigError, UserError
from edgecompact.methods import list_methods, run_method
from edgecompact.models import create_model
from edgecompact.pipeline import build_context
from edgecompact.report import bench_document, write_bench
from edgecompact.targets import get_target
from edgecompact.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="dataset spec, e.g. fashion-mnist, digits, cifar10:PATH")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the dataset's own)")
    p.add_argument("--limit", type=int, default=None, help="training images used (train + val), stratified")
    p.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    p.add_argument("--lr", type=float, default=0.05, help="baseline learning rate (SGD, cosine)")
    p.add_argument("--finetune-epochs", type=int, default=4, help="fine-tune epochs every method (and control) gets")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune learning rate (0.2x baseline)")
    p.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="every method's (and control's) fine-tune distils the baseline with this weight (0: off)")
    p.add_argument("--search-epochs", type=int, default=None, help="a method's search epochs (default: fine-tune)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--budget", default="0.33x", help="budget, e.g. 0.33x (the paper's 1/3 FLOPs), 48M")
    p.add_argument("--metric", choices=["flops", "params", "latency"], default="flops")
    p.add_argument("--profile", type=Path, default=None, help="latency table JSON for --target (default: the "
                   "target's table for this model, else its labelled roofline estimate)")
    p.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. group-lasso.strength=2 (repeatable)")
    p.add_argument("--target", default="host", help="target whose latency table (or labelled roofline estimate) "
                   "gives predicted ms; morphnet-latency uses it")
    p.add_argument("--measure-runs", type=int, default=200,
                   help="onnxruntime runs (batch 1, --threads threads) timing baseline and compact back to back; 0: off")
    p.add_argument("--remeasure", action="store_true", help="only re-time the finished results' ONNX files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channel-multiple", type=int, default=1, help="every searched width a multiple of this")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="deployment precision: searches judge and report top-1 at it (int8: onnxruntime's static QDQ)")
    p.add_argument("--drop-blocks", action="store_true", help="depth pruning: methods may remove residual blocks")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="baseline checkpoint and per-method run dirs (default runs/bench-methods/<protocol>)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "methods.json")
    p.add_argument("--fresh", action="store_true", help="discard results of a different protocol in --out")
    return p.parse_args(argv)


def method_options(sets: list[str], known: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in sets:
        key, eq, value = item.partition("=")
        method, dot, opt = key.partition(".")
        if not eq or not dot or method not in known:
            raise ConfigError(f"--set {item}: expected METHOD.KEY=VALUE with METHOD one of {', '.join(known)}")
        out.setdefault(method, {})[opt] = value
    return out


def protocol(a: argparse.Namespace, search_epochs: int, options: dict) -> str:
    size = f"{a.input_size}x{a.input_size}" if a.input_size else "native size"
    text = (f"{a.model}, {a.dataset} at {size}, {a.limit or 'all'} train+val images, baseline {a.epochs} epochs "
            f"lr {a.lr:g}; search {search_epochs} + fine-tune {a.finetune_epochs} epochs (lr {a.finetune_lr:g}, "
            f"batch {a.batch_size}; controls fine-tune search + fine-tune epochs); budget {a.metric} {a.budget}; "
            f"target {a.target}; onnxruntime {a.threads} thread(s), median of {a.measure_runs}; seed {a.seed}")
    if a.distill:
        text += f"; fine-tunes distil the baseline (alpha {a.distill:g}, T 4)"
    if a.channel_multiple > 1:
        text += f"; channel multiple {a.channel_multiple}"
    if a.drop_blocks:
        text += "; residual blocks may be removed"
    if a.precision != "fp32":
        text += f"; top-1 at {a.precision} (fp32 in the JSON)"
    if options:
        text += "; options " + json.dumps(options, sort_keys=True)
    return text


def load_previous(path: Path, proto: str, fresh: bool) -> list[dict]:
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not valid JSON (remove it or give another --out)") from None
    if doc.get("protocol") != proto:
        if fresh:
            return []
        raise ConfigError(f"{path}: holds results of another protocol ('{doc.get('protocol')}'); "
                          "pass --fresh to replace them or give another --out")
    return list(doc.get("results", []))


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    known = list_methods()
    methods = a.methods or known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)} (registered: {', '.join(known)})")
    options = method_options(a.set, known)
    search_epochs = a.search_epochs if a.search_epochs is not None else a.finetune_epochs
    proto = protocol(a, search_epochs, options)
    command = "python tools/bench_methods.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    results = load_previous(a.out, proto, a.fresh)
    slug = f"{a.dataset.split(':')[0]}-{a.model}-{a.input_size or 'native'}-{a.limit or 'all'}-e{a.epochs}-s{a.seed}"
    work = a.work_dir or ROOT / "runs" / "bench-methods" / slug
    # the trained baseline (work/baseline.pt) is shared by every budget; each budget's method runs live apart so
    # that their checkpoints are never resumed under another budget
    method_root = work if (a.metric, a.budget) == ("flops", "0.33x") else work / f"{a.metric}-{a.budget}"
    if a.channel_multiple > 1 or a.drop_blocks or a.precision != "fp32":
        method_root = method_root / (f"m{a.channel_multiple}{'-drop' if a.drop_blocks else ''}"
                                     f"{'' if a.precision == 'fp32' else '-' + a.precision}")
    if not 0 <= a.distill <= 1:
        raise ConfigError(f"--distill {a.distill:g}: expected a weight in [0, 1]")
    if a.distill:
        method_root = method_root / f"kd{a.distill:g}"

    def save() -> None:
        write_bench(a.out, bench_document("methods", command, proto, results))

    data = load_dataset(a.dataset, input_size=a.input_size, seed=a.seed, limit=a.limit)
    torch.manual_seed(a.seed)
    baseline = create_model(a.model, num_classes=data.num_classes, in_channels=data.in_channels,
                            input_size=data.input_size)
    hist = train(baseline, data.train, TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed),
          val_set=data.val, checkpoint=work / "baseline.pt", desc="baseline")
    baseline.eval()
    finetune = TrainConfig(epochs=a.finetune_epochs, lr=a.finetune_lr, batch_size=a.batch_size, seed=a.seed,
                           distill_alpha=a.distill)
    target = get_target(a.target)
    ctx = build_context(baseline, data, parse_budget(a.budget, a.metric), profile=a.profile, model_name=a.model,
                        finetune=finetune, search_epochs=search_epochs, channel_multiple=a.channel_multiple,
                        drop_blocks=a.drop_blocks, precision=a.precision, seed=a.seed, target=target,
                        log=lambda s: print(s, flush=True))
    shape = (1, data.in_channels, data.input_size, data.input_size)
    dataset = a.dataset.split(":")[0]
    if a.remeasure:
        remeasure(a, results, work, method_root, shape, target.name)
        save()
        print(a.out.with_suffix(".md").read_text())
        return
    if not any(r["name"] == "baseline" for r in results):
        test = data.test if data.test is not None else data.val
        widths = ctx.structure.baseline_widths()
        rec = {"name": "baseline", "model": a.model, "dataset": dataset,
               "mflops": round(ctx.flops(widths) / 1e6, 3), "params": int(ctx.params(widths)),
               "top1": round(evaluate(baseline, test), 2),
               "latency_ms": {"predicted": round(ctx.latency(widths), 4)},
               "wall_s": round(sum(e["seconds"] for e in hist["epochs"]), 1)}
        if a.precision != "fp32":
            from edgecompact.precision import calibration_inputs, evaluate_at_precision

            rec.update(precision=a.precision, top1_fp32=rec["top1"], top1=round(evaluate_at_precision(
                baseline, test, a.precision, calibration_inputs(data.train)), 2))
        if a.measure_runs:
            _export(baseline, shape, work / "baseline.onnx")
            rec["latency_ms"][f"{target.name}-ort"] = round(_measure_one(work / "baseline.onnx", shape, a), 4)
        results.append(rec)
        save()
    for name in methods:
        if any(r["name"] == name for r in results):
            print(f"{name}: already in {a.out}, skipped", flush=True)
            continue
        run_ctx = replace(ctx, run_dir=method_root / name, options=options.get(name, {}))
        try:
            res = run_method(name, run_ctx)
        except UserError as e:  # a method that cannot land on the budget says so; the others still run
            print(f"{name}: {e}", flush=True)
            continue
        m = res.metrics
        rec = {"name": name, "model": a.model, "dataset": dataset, "mflops": m["mflops"], "params": m["params"],
               "top1": m["top1"], "budget": m["budget"], "latency_ms": m.get("latency_ms", {}),
               "wall_s": m["wall_s"], "widths": res.arch.widths}
        if "precision" in m:
            rec.update(precision=m["precision"], top1_fp32=m["top1_fp32"])
        if a.measure_runs:  # baseline and compact timed interleaved in this process: their ratio is the speedup
            _export(baseline, shape, work / "baseline.onnx")
            _export(res.model, shape, method_root / name / "compact.onnx")
            _measure(rec, work / "baseline.onnx", method_root / name / "compact.onnx", shape, target.name, a)
        results.append(rec)
        save()
        print(f"{name}: {m['mflops']} MFLOPs, {m['params']} params, top-1 {m['top1']} %, "
              f"budget error {m['budget']['error_pct']} %, {m['wall_s']} s", flush=True)
    print(a.out.with_suffix(".md").read_text())


def _export(model, shape, path: Path) -> None:
    from edgecompact.deploy.onnx import export_onnx

    if not path.is_file():
        export_onnx(model.eval(), shape, path)


def _measure_one(path: Path, shape, a) -> float:
    import numpy as np

    from edgecompact.deploy.bench import time_ort

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return time_ort(path, x, runs=a.measure_runs, threads=a.threads)


def _measure(rec: dict, base: Path, compact: Path, shape, target: str, a) -> None:
    """onnxruntime ms of baseline and compact, interleaved (same load for both), into `rec`."""
    import numpy as np

    from edgecompact.deploy.bench import time_ort_pair

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    base_ms, comp_ms = time_ort_pair(base, compact, x, runs=a.measure_runs, threads=a.threads)
    rec.setdefault("latency_ms", {})[f"{target}-ort"] = round(comp_ms, 4)
    rec["latency_ms"][f"{target}-ort-baseline"] = round(base_ms, 4)
    rec["measured_speedup"] = {f"{target}-ort": round(base_ms / comp_ms, 3)}


def remeasure(a, results: list[dict], work: Path, method_root: Path, shape, target: str) -> None:
    """Re-time every finished result from its exported ONNX files (no training), interleaved with the baseline."""
    for rec in results:
        if rec["name"] == "baseline":
            rec.setdefault("latency_ms", {})[f"{target}-ort"] = round(_measure_one(work / "baseline.onnx", shape, a), 4)
            continue
        compact = method_root / rec["name"] / "compact.onnx"
        if compact.is_file():
            _measure(rec, work / "baseline.onnx", compact, shape, target, a)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
