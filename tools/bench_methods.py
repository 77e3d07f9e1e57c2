"""Methods benchmark: every registered search method and control at one budget (default 1/3 FLOPs), several seeds.

Per seed: the baseline every method starts from is trained for --epochs (checkpointed, resumable); the reference
baseline the drops are measured against is trained from scratch for every epoch a method gets in all
(--epochs + search + fine-tune), as are `uniform-scratch` and `--final scratch`. Each method runs through
`run_method` with `--final` (default best: inherit and scratch both trained, the higher validation top-1 kept;
the test split is only read for the reported number). After EACH method and seed the row is merged into --out
(JSON + Markdown; several processes may share one --out, e.g. one per seed), so a killed run keeps what finished and
a re-run with the same protocol skips it. Rows hold the mean and std over seeds, every seed's own record, and the
commit, command and date that produced it.
Run: python tools/bench_methods.py --dataset fashion-mnist --model resnet20 --input-size 28 --limit 8000 \
        --epochs 8 --search-epochs 2 --finetune-epochs 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import shlex
import statistics
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from edgecompact.budget import ALLOCATIONS, Budget, parse_budget
from edgecompact.data import load_dataset
from edgecompact.errors import ConfigError, UserError
from edgecompact.methods import list_methods, run_method
from edgecompact.models import create_model
from edgecompact.pipeline import build_context, search_latency_model, search_multiple
from edgecompact.report import bench_document, source_commit
from edgecompact.structure import analyze
from edgecompact.targets import get_target
from edgecompact.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
DEPTH_CONTROLS = ("uniform-depth-scratch",)  # need removable blocks (--drop-blocks)
# one width multiplier (methods/controls.py): the same network under any --allocation
UNIFORM_CONTROLS = ("uniform", "random", "uniform-scratch", "uniform-depth-scratch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="dataset spec, e.g. fashion-mnist, digits, cifar10:PATH")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the dataset's own)")
    p.add_argument("--limit", type=int, default=None, help="training images used (train + val), stratified")
    p.add_argument("--epochs", type=int, default=10, help="baseline training epochs (the methods' starting point)")
    p.add_argument("--lr", type=float, default=0.05, help="baseline (and from-scratch) learning rate (SGD, cosine)")
    p.add_argument("--finetune-epochs", type=int, default=4, help="fine-tune epochs every method (and control) gets")
    # 0.05 chosen on validation (benchmarks/inherit.md: mean val top-1 of uniform and Group Lasso 85.63 at 0.05 vs
    # 84.51 at 0.01); the search phase of Group Lasso and GenSynth's cycles train at this rate too
    p.add_argument("--finetune-lr", type=float, default=0.05,
                   help="fine-tune (inherit) and search learning rate (default chosen on validation)")
    p.add_argument("--final", choices=["inherit", "scratch", "best"], default="best",
                   help="final training of each found network (best: both, chosen on validation)")
    p.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="every fine-tune and from-scratch training distils the baseline with this weight (0: off)")
    p.add_argument("--search-epochs", type=int, default=None, help="a method's search epochs (default: fine-tune)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--budget", default="1/3x", help="budget, e.g. 1/3x (the paper's 1/3 FLOPs), 0.5x, 48M")
    p.add_argument("--metric", choices=["flops", "params", "latency"], default="flops")
    p.add_argument("--profile", type=Path, default=None, help="latency table JSON for --target (default: the "
                   "target's table for this model, else its labelled roofline estimate)")
    p.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. group-lasso.strength=2 (repeatable)")
    p.add_argument("--target", default="host", help="target whose latency table (or labelled roofline estimate) "
                   "gives predicted ms; morphnet-latency uses it")
    p.add_argument("--measure-runs", type=int, default=200,
                   help="onnxruntime runs (batch 1, --threads threads) timing baseline and compact interleaved; 0: off")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (data split, init, search): mean +- std")
    p.add_argument("--channel-multiple", type=int, default=None,
                   help="every searched width a multiple of this (default: the target's as a search resolves it: "
                   "host latency budgets step in this CPU's fp32 lanes, FLOP/param budgets in 1)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="budget tolerance (a latency budget's is judged on measured ms)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="how the methods' channel scores are cut to the budget (default: the metric's; the "
                   "controls' uniform widths do not depend on it)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="deployment precision: searches judge and report top-1 at it (int8: onnxruntime's static QDQ)")
    p.add_argument("--drop-blocks", action="store_true", help="depth pruning: methods may remove residual blocks")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints and per-method run dirs (default runs/bench-methods/<protocol>/s<seed>)")
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


def total_epochs(a: argparse.Namespace, search_epochs: int) -> int:
    return a.epochs + search_epochs + a.finetune_epochs


def protocol(a: argparse.Namespace, search_epochs: int, options: dict) -> str:
    size = f"{a.input_size}x{a.input_size}" if a.input_size else "native size"
    text = (f"{a.model}, {a.dataset} at {size}, {a.limit or 'all'} train+val images, methods start from a baseline "
            f"trained {a.epochs} epochs (lr {a.lr:g}); search {search_epochs} + fine-tune {a.finetune_epochs} epochs "
            f"(lr {a.finetune_lr:g}, batch {a.batch_size}; uniform/random fine-tune search + fine-tune epochs); "
            f"from scratch (reference baseline, uniform-scratch, --final scratch): {total_epochs(a, search_epochs)} "
            f"epochs lr {a.lr:g}; final training {a.final} (chosen on validation); budget {a.metric} {a.budget}; "
            f"target {a.target}; onnxruntime {a.threads} thread(s), median of {a.measure_runs}, interleaved pairs")
    if a.distill:
        text += f"; every fine-tune and from-scratch training distils the baseline (alpha {a.distill:g}, T 4)"
    else:
        text += "; no distillation anywhere (GenSynth's cycles included)"
    if a.channel_multiple > 1:
        text += f"; channel multiple {a.channel_multiple}"
    if a.tolerance != 0.02:
        text += f"; budget tolerance {100 * a.tolerance:g}%"
    if a.allocation:
        text += f"; allocation {a.allocation} (the methods' scores; controls stay uniform)"
    if a.drop_blocks:
        text += "; residual blocks may be removed"
    if a.precision != "fp32":
        text += f"; top-1 at {a.precision} (fp32 in the JSON)"
    if options:
        text += "; options " + json.dumps(options, sort_keys=True)
    return text


@contextlib.contextmanager
def locked(out: Path, key: str | None = None):
    """Several processes (one per seed) merge rows into one --out: one at a time. With `key` (a checkpoint's
    path), processes sharing a seed's work dir train its baselines one at a time (the others then load them)."""
    name = out.name if key is None else hashlib.sha1(key.encode()).hexdigest()[:16]
    lock = ROOT / "runs" / "locks" / (name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_doc(path: Path, proto: str, fresh: bool) -> list[dict]:
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


def done(path: Path, proto: str, name: str, seed: int) -> bool:
    rows = load_doc(path, proto, fresh=True)
    return any(r["name"] == name and any(x["seed"] == seed for x in r.get("per_seed", [])) for r in rows)


def merge(path: Path, proto: str, command: str, rec: dict) -> None:
    """Put one seed's record into its method's row (replacing that seed), re-aggregate, write JSON + Markdown."""
    with locked(path):
        rows = load_doc(path, proto, fresh=True)
        row = next((r for r in rows if r["name"] == rec["name"]), None)
        seeds = [x for x in (row or {}).get("per_seed", []) if x["seed"] != rec["seed"]] + [rec]
        new = aggregate(sorted(seeds, key=lambda x: x["seed"]))
        rows = [new if r["name"] == rec["name"] else r for r in rows] if row else [*rows, new]
        order = ["baseline", *list_methods()]
        rows.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        doc = bench_document("methods", command, proto, rows)
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
        path.with_suffix(".md").write_text(markdown(doc))


def _mean(values: list[float], digits: int = 3) -> float:
    return round(statistics.fmean(values), digits)


def aggregate(per_seed: list[dict]) -> dict:
    """One row: means over seeds (std of top-1), each seed's record kept under `per_seed`."""
    first, last = per_seed[0], max(per_seed, key=lambda x: x["date"])
    top1 = [x["top1"] for x in per_seed]
    row = {"name": first["name"], "model": first["model"], "dataset": first["dataset"],
           "seeds": [x["seed"] for x in per_seed], "top1": _mean(top1, 2), "top1_per_seed": top1}
    if len(top1) > 1:
        row["top1_std"] = round(statistics.stdev(top1), 2)
    for key in ("top1_val", "top1_start", "top1_fp32", "mflops", "params", "wall_s"):
        if all(key in x for x in per_seed):
            row[key] = _mean([x[key] for x in per_seed], 3 if key == "mflops" else 2)
    if "params" in row:
        row["params"] = round(row["params"])
    if "precision" in first:
        row["precision"] = first["precision"]
    if "budget" in first:
        row["budget"] = {"metric": first["budget"]["metric"], "target": first["budget"]["target"],
                         "achieved": _mean([x["budget"]["achieved"] for x in per_seed], 4),
                         "error_pct": _mean([x["budget"]["error_pct"] for x in per_seed], 2)}
        for key in ("measured_error_pct", "paired_error_pct"):  # a latency budget: the loop's, then this bench's own
            if all(key in x["budget"] for x in per_seed):
                errors = [x["budget"][key] for x in per_seed]
                row["budget"][key] = _mean(errors, 2)
                row["budget"][key.replace("_pct", "_max_abs_pct")] = max(abs(e) for e in errors)
    lat_keys = set.intersection(*(set(x.get("latency_ms", {})) for x in per_seed))
    if lat_keys:
        row["latency_ms"] = {k: _mean([x["latency_ms"][k] for x in per_seed], 4) for k in sorted(lat_keys)}
    speed_keys = set.intersection(*(set(x.get("measured_speedup", {})) for x in per_seed))
    if speed_keys:
        row["measured_speedup"] = {k: _mean([x["measured_speedup"][k] for x in per_seed], 3)
                                   for k in sorted(speed_keys)}
    if all("final" in x for x in per_seed):
        row["final"] = "/".join(x["final"] for x in per_seed)
    if "latency_source" in first:
        row["latency_source"] = first["latency_source"]
    row.update(commit=last["commit"], command=last["command"], date=last["date"], per_seed=per_seed)
    return row


def verdict(a: dict, b: dict) -> str:
    """a's mean top-1 against b's: a difference within one std (the larger of the two) is a tie."""
    diff = a["top1"] - b["top1"]
    std = max(a.get("top1_std", 0.0), b.get("top1_std", 0.0))
    if len(a["seeds"]) < 2 or len(b["seeds"]) < 2:
        return f"{diff:+.2f} (1 seed: no ranking)"
    return f"{diff:+.2f} ({'tie' if abs(diff) <= std else 'better' if diff > 0 else 'worse'})"


def budget_cell(budget: dict) -> str:
    """The budget error a row is judged on: measured (this bench's own paired timing of the final network, worst
    seed beside the mean) where the budget is in ms and was timed, else the cost model's."""
    if "paired_error_pct" in budget:
        return f"{budget['paired_error_pct']:+.2f} measured (worst {budget['paired_error_max_abs_pct']:.2f})"
    if "measured_error_pct" in budget:
        return f"{budget['measured_error_pct']:+.2f} measured"
    if budget.get("metric") == "latency" and "error_pct" in budget:
        return f"{budget['error_pct']} predicted"
    return str(budget.get("error_pct", ""))


def markdown(doc: dict) -> str:
    rows = doc["results"]
    base = next((r for r in rows if r["name"] == "baseline"), None)
    control = next((r for r in rows if r["name"] == "uniform-scratch"), None)
    lines = [f"# {doc['benchmark']}", "", f"- command: `{doc['command']}`", f"- machine: {doc['machine']}",
             f"- date: {doc['date']}", f"- protocol: {doc['protocol']}",
             ("- top-1: test split, mean +- std over seeds; every choice (final training, early stops) on validation. "
             "`vs uniform-scratch`: a difference within one std is a tie. `final`: which final training won, per "
             "seed. Speedup: onnxruntime, compact and baseline timed interleaved in one process."), "",
             ("| method | seeds | MFLOPs | params | top-1 % | drop vs baseline | vs uniform-scratch | final | "
             "budget error % | predicted ms | measured ms | speedup | commit |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1']:.2f}" + (f" +- {r['top1_std']:.2f}" if "top1_std" in r else "")
        if r["name"] == "baseline" and "top1_start" in r:
            top1 += f" (start: {r['top1_start']:.2f})"
        lat = r.get("latency_ms", {})
        measured = next((f"{v:.3f}" for k, v in lat.items() if k.endswith("-ort")), "")
        speed = next(iter(r.get("measured_speedup", {}).values()), None)
        cells = [r["name"], ",".join(map(str, r["seeds"])), r.get("mflops"), r.get("params"), top1,
                 "" if r is base or base is None else f"{base['top1'] - r['top1']:.2f}",
                 "" if control is None or r is control or r is base else verdict(r, control),
                 r.get("final", ""), budget_cell(r.get("budget") or {}), lat.get("predicted", ""),
                 measured, f"{speed:.2f}x" if speed else "", r.get("commit", "")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    sources = sorted({r["latency_source"] for r in rows if "latency_source" in r})
    if sources:
        lines += ["", "Predicted latency from: " + "; ".join(sources)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    known = list_methods()
    methods = a.methods or [m for m in known if a.drop_blocks or m not in DEPTH_CONTROLS]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)} (registered: {', '.join(known)})")
    if not 0 <= a.distill <= 1:
        raise ConfigError(f"--distill {a.distill:g}: expected a weight in [0, 1]")
    options = method_options(a.set, known)
    budget = parse_budget(a.budget, a.metric, a.tolerance, a.allocation)  # a bad --budget or --tolerance before any training
    # the multiple `edgecompact search` would use (pipeline.search_multiple)
    a.channel_multiple = search_multiple(get_target(a.target), a.channel_multiple,
                                         a.metric == "latency").channel_multiple
    search_epochs = a.search_epochs if a.search_epochs is not None else a.finetune_epochs
    proto = protocol(a, search_epochs, options)
    command = "python tools/bench_methods.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    with locked(a.out):
        rows = load_doc(a.out, proto, a.fresh)
        if a.fresh and not rows and a.out.is_file():
            a.out.unlink()
    for seed in a.seeds:
        run_seed(a, seed, budget, methods, options, search_epochs, proto, command)
    print(a.out.with_suffix(".md").read_text())


def run_seed(a: argparse.Namespace, seed: int, budget: Budget, methods: list[str], options: dict,
             search_epochs: int, proto: str, command: str) -> None:
    slug = f"{a.dataset.split(':')[0]}-{a.model}-{a.input_size or 'native'}-{a.limit or 'all'}-e{a.epochs}"
    work = (a.work_dir or ROOT / "runs" / "bench-methods" / slug) / f"s{seed}"
    # the trained baseline (work/baseline.pt) is shared by every budget; each budget's method runs live apart so
    # that their checkpoints are never resumed under another budget
    method_root = work / f"{a.metric}-{a.budget.replace('/', '_')}-{a.final}"
    if a.channel_multiple > 1 or a.drop_blocks or a.precision != "fp32":
        method_root = method_root / (f"m{a.channel_multiple}{'-drop' if a.drop_blocks else ''}"
                                     f"{'' if a.precision == 'fp32' else '-' + a.precision}")
    if a.distill:
        method_root = method_root / f"kd{a.distill:g}"
    method_root = method_root / f"ft{a.finetune_lr:g}"  # never resume another fine-tune rate's checkpoints
    data = load_dataset(a.dataset, input_size=a.input_size, seed=seed, limit=a.limit)
    test = data.report_split
    dataset = a.dataset.split(":")[0]
    shape = (1, data.in_channels, data.input_size, data.input_size)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model(a.model, num_classes=data.num_classes, in_channels=data.in_channels,
                            input_size=data.input_size)

    base_cfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed)
    baseline = fresh_model()
    with locked(a.out, str(work / "baseline.pt")):
        train(baseline, data.train, base_cfg, val_set=data.val, checkpoint=work / "baseline.pt", desc="baseline")
    baseline.eval()
    scratch = replace(base_cfg, epochs=total_epochs(a, search_epochs), distill_alpha=a.distill)
    finetune = TrainConfig(epochs=a.finetune_epochs, lr=a.finetune_lr, batch_size=a.batch_size, seed=seed,
                           distill_alpha=a.distill)
    target, structure, latency = get_target(a.target), None, None
    if a.metric == "latency":  # as a search does: the table at the search's multiple, profiled here on first use
        target = search_multiple(target, a.channel_multiple, True)
        structure = analyze(baseline, shape[1:], a.model, drop_blocks=a.drop_blocks)
        latency = search_latency_model(structure, target, a.profile, needs_ms=True)
    ctx = build_context(baseline, data, budget, profile=a.profile,
                        model_name=a.model, finetune=finetune, search_epochs=search_epochs, scratch=scratch,
                        final=a.final, channel_multiple=a.channel_multiple, drop_blocks=a.drop_blocks,
                        precision=a.precision, seed=seed, target=target, structure=structure, latency=latency,
                        log=lambda s: print(s, flush=True))
    stamp = {"seed": seed, "commit": source_commit(ROOT), "command": command, "date": date.today().isoformat()}
    if not done(a.out, proto, "baseline", seed):
        # the reference: full width, trained from scratch for as many epochs as a method gets in all
        reference = fresh_model()
        with locked(a.out, str(work / "baseline-equal.pt")):
            hist = train(reference, data.train, replace(scratch, distill_alpha=0.0), val_set=data.val,
                         checkpoint=work / "baseline-equal.pt", desc="baseline (equal epochs)")
        reference.eval()
        widths = ctx.structure.baseline_widths()
        rec = {"name": "baseline", "model": a.model, "dataset": dataset, **stamp,
               "mflops": round(ctx.flops(widths) / 1e6, 3), "params": int(ctx.params(widths)),
               "top1": round(evaluate(reference, test), 2), "top1_val": round(evaluate(reference, data.val), 2),
               "top1_start": round(evaluate(baseline, test), 2),
               "latency_ms": {"predicted": round(ctx.latency(widths), 4)},
               "wall_s": round(sum(e["seconds"] for e in hist["epochs"]), 1)}
        if a.precision != "fp32":  # top1: onnxruntime's own on the shipped model; the search's proxy beside it
            from edgecompact.deploy.onnx import runtime_top1
            from edgecompact.precision import calibration_inputs, evaluate_at_precision

            calib = calibration_inputs(data.train)
            rec.update(precision=a.precision, top1_fp32=rec["top1"], top1_runtime="onnxruntime",
                       top1=round(runtime_top1(reference, test, a.precision, calib), 2),
                       top1_proxy=round(evaluate_at_precision(reference, test, a.precision, calib), 2))
        merge(a.out, proto, command, rec)
    for name in methods:
        if done(a.out, proto, name, seed):
            print(f"{name} seed {seed}: already in {a.out}, skipped", flush=True)
            continue
        opts = options.get(name, {})
        # runs with non-default options live apart, so that a sweep never resumes another setting's checkpoints
        run_name = name + "".join(f"-{k}{v}" for k, v in sorted(opts.items()))
        if a.allocation and name not in UNIFORM_CONTROLS:  # the controls' runs are shared by every allocation
            run_name = f"alloc-{a.allocation}/{run_name}"
        run_ctx = replace(ctx, run_dir=method_root / run_name, options=opts)
        try:
            res = run_method(name, run_ctx)
        except UserError as e:  # a method that cannot land on the budget says so; the others still run
            print(f"{name} seed {seed}: {e}", flush=True)
            continue
        m = res.metrics
        rec = {"name": name, "model": a.model, "dataset": dataset, **stamp, "mflops": m["mflops"],
               "params": m["params"], "top1": m["top1"], "top1_val": round(evaluate(res.model, data.val), 2),
               "final": m["final"], "final_val_top1": m["final_val_top1"], "budget": m["budget"],
               "latency_ms": m.get("latency_ms", {}), "wall_s": m["wall_s"], "widths": res.arch.widths}
        for key in ("precision", "top1_fp32", "top1_proxy"):
            if key in m:
                rec[key] = m[key]
        if a.measure_runs:  # baseline and compact timed interleaved in this process: their ratio is the speedup
            _export(baseline, shape, work / "baseline.onnx")
            _export(res.model, shape, run_ctx.run_dir / "compact.onnx")
            _measure(rec, work / "baseline.onnx", run_ctx.run_dir / "compact.onnx", shape, target.name, a)
        merge(a.out, proto, command, rec)
        print(f"{name} seed {seed}: {m['mflops']} MFLOPs, {m['params']} params, top-1 {m['top1']} % "
              f"(final {m['final']}, val {m['final_val_top1']}), budget error {m['budget']['error_pct']} %, "
              f"{m['wall_s']} s", flush=True)


def _export(model, shape, path: Path) -> None:
    from edgecompact.deploy.onnx import export_onnx

    if not path.is_file():
        export_onnx(model.eval(), shape, path)


def _measure(rec: dict, base: Path, compact: Path, shape, target: str, a) -> None:
    """onnxruntime ms of baseline and compact, interleaved (same load for both), into `rec`."""
    import numpy as np

    from edgecompact.deploy.bench import time_ort_pair

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    base_ms, comp_ms = time_ort_pair(base, compact, x, runs=a.measure_runs, threads=a.threads)
    rec.setdefault("latency_ms", {})[f"{target}-ort"] = round(comp_ms, 4)
    rec["latency_ms"][f"{target}-ort-baseline"] = round(base_ms, 4)
    rec["measured_speedup"] = {f"{target}-ort": round(base_ms / comp_ms, 3)}
    budget = rec.get("budget") or {}
    if budget.get("measured"):  # the latency budget judged again on this pair: the ratio it asked for
        ratio = budget["measured_target_ms"] / budget["measured_baseline_ms"]
        budget["paired_error_pct"] = round(100 * (comp_ms / base_ms / ratio - 1), 2)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
