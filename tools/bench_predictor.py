"""Predictor accuracy: LatencyTable predictions vs whole-model latency of random ResNet-20/32 ArchSpecs.

Each random architecture (every group's width uniform in [1/8, 1] of the baseline, off the table grid) is
slimmed and exported to ONNX (edgecompact.deploy.onnx.export_onnx), then timed whole on the host with the
runtime its table measured, with the table's statistic (edgecompact.profiling.timed_ms) and thread count:
- onnxruntime: a deploy-configured session (`edgecompact.profiling.time_onnx`);
- tvm: compiled by the deploy path (edgecompact.deploy.artifact.compile_onnx, untuned like the table).
A correction model_ms = scale * sum_of_layers + per_layer_ms * layers (a layer timed alone pays the
runtime's per-call overhead, and its layout reorders, that a whole model pays once) is fitted on the first
half by relative least squares and judged on the held-out second half, beside a scale-only fit.
Writes benchmarks/predictor.json/.md/.png (onnxruntime) or predictor_tvm.* (tvm).
Run: python tools/bench_predictor.py --runtime onnxruntime --n 60 [--reuse] [--write-correction]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgecompact.report import machine, source_commit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# model@CxHxW=table: each setting's archs are predicted by its table (Fashion-MNIST runs resnet20 at 1x28x28)
# model@CxHxW[=table]: each setting's archs are predicted by its table (Fashion-MNIST runs resnet20 at 1x28x28);
# without a table, this CPU's own for the model (profiled into the user cache first if there is none)
SETTINGS = {
    "onnxruntime": "resnet20@3x32x32,resnet32@3x32x32,resnet20@1x28x28",
    "tvm": "resnet20@3x32x32,resnet32@3x32x32",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=sorted(SETTINGS), default="onnxruntime")
    ap.add_argument(
        "--settings", help=f"model@CxHxW=table,... (default for the runtime, e.g. {SETTINGS['tvm']})"
    )
    ap.add_argument("--n", type=int, default=60, help="random architectures in all (split over the settings)")
    ap.add_argument("--runs", type=int, default=50, help="single runs per model for measured_median_ms")
    ap.add_argument("--pair-runs", type=int, default=200,
                    help="interleaved runs of each arch beside its baseline (deploy's paired median)")
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (as used for the tables)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-blocks", action="store_true",
                    help="the depth search's space: each removable residual block is removed with probability 1/4")
    ap.add_argument("--out", help="benchmarks/ file stem (default predictor, or predictor_<runtime>)")
    ap.add_argument("--note", default="", help="said beside the machine, e.g. what else ran on it")
    ap.add_argument("--reuse", action="store_true", help="reuse measurements in the output JSON")
    ap.add_argument(
        "--write-correction", action="store_true", help="store the fitted correction in the tables"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnxruntime
    import tvm

    from edgecompact.cost.latency import LatencyTable, default_table_path
    from edgecompact.deploy.bench import time_ort, time_ort_pair
    from edgecompact.deploy.onnx import INPUT_NAME, export_onnx
    from edgecompact.deploy.tvm import set_num_threads
    from edgecompact.models import create_model
    from edgecompact.profiling import profile
    from edgecompact.structure import analyze, keep_from_scores, slim
    from edgecompact.targets import get_target

    set_num_threads(args.threads)
    target = get_target("host")
    out = BENCH / (
        args.out or ("predictor" if args.runtime == "onnxruntime" else f"predictor_{args.runtime}")
    )
    settings = []  # (label, model name, input shape, table)
    tables: dict[str, LatencyTable] = {}
    for item in (args.settings or SETTINGS[args.runtime]).split(","):
        label, _, path = item.partition("=")
        name, _, shape = label.partition("@")
        c, h, w = (int(v) for v in shape.split("x"))
        base = create_model(name, in_channels=c, input_size=h)
        structure = analyze(base, (c, h, w), name, drop_blocks=args.drop_blocks)
        if not path:  # this CPU's table for the model, measured now where it lacks this shape
            path = default_table_path(target, name)  # what a search uses (the host ships onnxruntime)
            path = str(path if args.runtime == target.runtime else path.with_suffix(f".{args.runtime}.json"))
            profile(structure, target, Path(path), runtime=args.runtime, threads=args.threads)
        table = tables.setdefault(path, LatencyTable.load(ROOT / path, target))
        if table.runtime != args.runtime:
            sys.exit(f"{path}: measured with {table.runtime}, not {args.runtime}")
        settings.append((label, base, structure, table))
    rng = random.Random(args.seed)
    grid_widths = {c for t in tables.values() for e in t.entries.values() for c in e.c_out}
    archs = []
    while len(archs) < args.n:
        label, _, s, _ = settings[len(archs) % len(settings)]
        m = int(settings[len(archs) % len(settings)][3].provenance.get("channel_multiple", 1))
        widths = {g: m * rng.randint(max(1, -(-full // (8 * m))), full // m) if full > m else full
                  for g, full in s.groups.items()}
        for groups in s.blocks().values():  # the search's space: a removable residual block goes with p 1/4
            if rng.random() < 0.25:
                widths.update(dict.fromkeys(groups, 0))
        if m == 1 and all(w in grid_widths for w in widths.values()):
            continue  # not a grid architecture (at a multiple every width the search can choose is on the grid)
        archs.append((len(archs) % len(settings), {"model": s.model_name, "widths": widths}))

    old, old_commit = {}, {}  # a reused measurement keeps the commit of the code that took it
    if args.reuse and out.with_suffix(".json").is_file():
        for r in json.loads(out.with_suffix(".json").read_text())["results"]:
            if "arch" in r:
                old[(r["setting"], json.dumps(r["arch"], sort_keys=True))] = (
                    r["measured_ms"],
                    r["measured_median_ms"],
                    *([r["paired_baseline_ms"], r["paired_ms"]] if "paired_ms" in r else []),
                )
                old_commit[(r["setting"], json.dumps(r["arch"], sort_keys=True))] = r.get("commit")
    code = source_commit(ROOT)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        base_onnx, raw_base, base_layers = {}, {}, {}  # each setting's baseline, timed beside each of its archs
        for which, (label, base, s, table) in enumerate(settings):
            base_onnx[which] = Path(tmp) / f"baseline-{which}.onnx"
            export_onnx(base, (1, *s.input_shape), base_onnx[which])
            raw_base[which] = table.predict(s, s.baseline_widths(), corrected=False)
            base_layers[which] = _layers(s, s.baseline_widths())
        for k, (which, arch) in enumerate(archs):
            label, base, s, table = settings[which]
            widths = arch["widths"]
            raw = table.predict(s, widths, corrected=False)
            key = (label, json.dumps(arch, sort_keys=True))
            measured = old.get(key)
            if measured is None:
                start = time.perf_counter()
                onnx_path = Path(tmp) / f"{k}.onnx"
                export_onnx(slim(base, s, keep_from_scores(s, widths)), (1, *s.input_shape), onnx_path)
                x = np.random.default_rng(k).standard_normal((1, *s.input_shape)).astype("float32")
                measured = _measure(args.runtime, onnx_path, x, INPUT_NAME, args, target, time_ort)
                if args.runtime == "onnxruntime":  # deploy's statistic: median of interleaved runs beside the baseline
                    measured = (*measured, *time_ort_pair(base_onnx[which], onnx_path, x, args.pair_runs,
                                                          args.threads))
                print(
                    f"[{k + 1}/{len(archs)}] {label} measured {measured[0]:.3f} ms (median "
                    f"{measured[1]:.3f}), predicted {raw:.3f} ms ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            records.append(
                {
                    "setting": label,
                    "arch": arch,
                    "layers": _layers(s, widths),
                    "baseline_layers": base_layers[which],
                    "predicted_raw_ms": round(raw, 4),
                    "predicted_raw_baseline_ms": round(raw_base[which], 4),
                    "measured_ms": round(measured[0], 4),
                    "measured_median_ms": round(measured[1], 4),
                    "commit": old_commit.get(key) if key in old else code,
                }
            )
            if len(measured) == 4:
                records[-1].update(paired_baseline_ms=round(measured[2], 4), paired_ms=round(measured[3], 4),
                                   paired_ratio=round(measured[3] / measured[2], 4))
            if k % 5 == 4:
                _write(out, args, records, None, tables, [tvm.__version__, onnxruntime.__version__])

    half = len(records) // 2
    train, test = records[:half], records[half:]
    scale_only = float(np.median([r["measured_ms"] / r["predicted_raw_ms"] for r in train]))
    # relative least squares: every row divided by its measurement, so small and large models weigh alike
    a = np.array([[r["predicted_raw_ms"] / r["measured_ms"], r["layers"] / r["measured_ms"]] for r in train])
    scale, per_layer = np.linalg.lstsq(a, np.ones(len(train)), rcond=None)[0]
    for k, r in enumerate(records):
        r["predicted_scale_ms"] = round(scale_only * r["predicted_raw_ms"], 4)
        r["predicted_ms"] = round(scale * r["predicted_raw_ms"] + per_layer * r["layers"], 4)
        r["split"] = "fit" if k < half else "held-out"
        # what a relative latency budget is judged on: the compact's ms over the baseline's, timed as a pair
        base_pred = scale * r["predicted_raw_baseline_ms"] + per_layer * r["baseline_layers"]
        r["predicted_ratio"] = round(r["predicted_ms"] / base_pred, 4)
        r["predicted_raw_ratio"] = round(r["predicted_raw_ms"] / r["predicted_raw_baseline_ms"], 4)
    paired_fit = None
    if all("paired_ms" in r for r in records):  # the same correction fitted to deploy's statistic instead
        a = np.array([[r["predicted_raw_ms"] / r["paired_ms"], r["layers"] / r["paired_ms"]] for r in train])
        p_scale, p_layer = np.linalg.lstsq(a, np.ones(len(train)), rcond=None)[0]
        paired_fit = {"scale": round(float(p_scale), 6), "per_layer_ms": round(float(p_layer), 6)}
        for r in records:
            r["predicted_paired_fit_ms"] = round(p_scale * r["predicted_raw_ms"] + p_layer * r["layers"], 4)
    correction = {
        "scale": round(float(scale), 6),
        "per_layer_ms": round(float(per_layer), 6),
        "offset_ms": 0.0,
        "fitted_on": f"tools/bench_predictor.py: {len(train)} random ResNet-20/32 archs "
        f"({args.runtime}), {datetime.date.today().isoformat()}",
    }
    helps = _summary(test, "predicted_ms")["mape"] < _summary(test, "predicted_raw_ms")["mape"]
    if args.write_correction:
        for path, table in tables.items():
            table.correction = correction if helps else {"scale": 1.0, "offset_ms": 0.0, "fitted_on": None}
            table.save(ROOT / path)
            print(f"{path}: correction {'written' if helps else 'not written (no held-out gain)'}")
    _write(out, args, records, correction, tables, [tvm.__version__, onnxruntime.__version__], paired_fit)
    _plot(records, out.with_suffix(".png"), args.runtime)


def _layers(structure, widths: dict[str, int]) -> int:
    """Convs and linear layers the network at `widths` runs (BatchNorm is folded; a removed block runs none)."""
    return sum(1 for layer, ci, co in structure.channels(widths) if layer.op != "batchnorm" and ci and co)


def _measure(runtime: str, onnx_path: Path, x: np.ndarray, input_name: str, args, target, time_ort):
    """(the tables' statistic, median of args.runs single runs) of the whole model, in ms."""
    from edgecompact.profiling import time_onnx, timed_ms, tvm_runs

    if runtime == "onnxruntime":
        return (
            time_onnx(onnx_path, {input_name: x}, args.threads),
            time_ort(onnx_path, x, runs=args.runs, threads=args.threads),
        )
    from edgecompact.deploy.artifact import compile_onnx
    from edgecompact.deploy.tvm import time_executable

    ex = compile_onnx(onnx_path, target)
    stat = timed_ms(tvm_runs(ex, [x]))
    return stat, statistics.median(time_executable(ex, [x], number=1, repeat=args.runs))


def _summary(records: list[dict], key: str, ref: str = "measured_ms") -> dict:
    err = [(r[key] - r[ref]) / r[ref] for r in records]
    return {
        "within_10pct": round(float(np.mean([abs(e) <= 0.10 for e in err])), 3),
        "mape": round(float(np.mean(np.abs(err)) * 100), 2),
        "mean_err_pct": round(float(np.mean(err)) * 100, 2),
        "n": len(records),
    }


def _write(
    out: Path, args: argparse.Namespace, records: list[dict], correction: dict | None, tables, versions,
    paired_fit: dict | None = None,
) -> None:
    import edgecompact

    results = list(records)
    s = None
    if correction is not None:
        test = [r for r in records if r["split"] == "held-out"]
        s = {
            "name": "summary",
            "commit": source_commit(ROOT),  # the fit and the judgement; each row keeps its measurement's
            "split": "held-out",
            **_summary(test, "predicted_ms"),
            "before_correction": _summary(test, "predicted_raw_ms"),
            "scale_only": {
                "scale": round(
                    float(np.median([r["predicted_scale_ms"] / r["predicted_raw_ms"] for r in test])), 6
                ),
                **_summary(test, "predicted_scale_ms"),
            },
            "correction": correction,
            "per_setting_held_out": {
                label: {
                    "before": _summary([r for r in test if r["setting"] == label], "predicted_raw_ms"),
                    "after": _summary([r for r in test if r["setting"] == label], "predicted_ms"),
                }
                for label in dict.fromkeys(r["setting"] for r in test)
            },
            "held_out_corrected_vs_median": _summary(test, "predicted_ms", "measured_median_ms"),
        }
        if paired_fit and all("paired_ms" in r for r in test):  # deploy's statistic (paired median) and the budget's quantity
            s["held_out_vs_paired_median"] = _summary(test, "predicted_ms", "paired_ms")
            s["held_out_fitted_to_paired_median"] = _summary(test, "predicted_paired_fit_ms", "paired_ms")
            s["correction_fitted_to_paired_median"] = paired_fit
            s["held_out_ratio_vs_paired"] = _summary(test, "predicted_ratio", "paired_ratio")
            s["held_out_raw_ratio_vs_paired"] = _summary(test, "predicted_raw_ratio", "paired_ratio")
        results.append(s)
    stat = next(iter(tables.values())).provenance.get("statistic")
    doc = {
        "benchmark": out.name,
        "command": "python tools/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine() + (f"; {args.note}" if args.note else ""),
        "date": datetime.date.today().isoformat(),
        "versions": {
            "edgecompact": edgecompact.__version__,
            "torch": torch.__version__.split("+")[0],
            "tvm": versions[0],
            "onnxruntime": versions[1],
        },
        "protocol": f"{len(records)} random ArchSpecs (each group uniform in [1/8, 1] of its width, in "
        "multiples of its table's channel_multiple, not all on the table grid) over settings "
        f"{args.settings or SETTINGS[args.runtime]}; host, {args.runtime}, "
        f"{args.threads} thread(s); measured_ms: the tables' statistic ({stat}), measured_median_ms: median "
        f"of {args.runs} single runs; predictions judged against measured_ms; tables "
        + ", ".join(f"{p} ({t.label})" for p, t in tables.items())
        + "; correction fitted on the first half, judged on the held-out second half",
        "results": results,
    }
    BENCH.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    if s is None:
        return
    b, sc = s["before_correction"], s["scale_only"]
    rows = [
        ("uncorrected sum of layers", b),
        (f"scale only ({sc['scale']:.3f} x sum)", sc),
        (
            f"corrected ({correction['scale']:.3f} x sum {correction['per_layer_ms'] * 1e3:+.1f} us x layers)",
            s,
        ),
    ]
    per = [
        f"| {label} | {v['before']['n']} | {v['before']['within_10pct'] * 100:.0f}% / "
        f"{v['after']['within_10pct'] * 100:.0f}% | {v['before']['mape']:.1f}% / {v['after']['mape']:.1f}% |"
        for label, v in s["per_setting_held_out"].items()
    ]
    out.with_suffix(".md").write_text(
        f"# Predictor accuracy ({args.runtime})\n\n`{doc['command']}` ({doc['date']}, {doc['machine']}).\n\n"
        f"{doc['protocol']}.\n\nHeld-out architectures: {s['n']}.\n\n"
        "| prediction | within +-10% | MAPE | mean error |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {v['within_10pct'] * 100:.0f}% | {v['mape']:.1f}% | {v['mean_err_pct']:+.1f}% |"
            for name, v in rows
        )
        + "\n\nPer setting (held-out, uncorrected / corrected):\n\n"
        "| setting | n | within +-10% | MAPE |\n|---|---|---|---|\n"
        + "\n".join(per)
        + _paired_lines(s)
        + f"\n\n![predicted vs measured]({out.with_suffix('.png').name})\n"
    )


def _paired_lines(s: dict) -> str:
    """Held-out accuracy judged as deploy and the latency loop judge: the paired median (compact and baseline
    interleaved, deploy's onnxruntime session) and the ratio to the baseline a relative budget is set in."""
    if "held_out_ratio_vs_paired" not in s:
        return ""
    fit = s["correction_fitted_to_paired_median"]
    rows = [("corrected ms vs paired median ms", s["held_out_vs_paired_median"]),
            ((f"fitted to paired medians ({fit['scale']:.3f} x sum {fit['per_layer_ms'] * 1e3:+.1f} us x layers)"
             " vs paired median ms"), s["held_out_fitted_to_paired_median"]),
            ("uncorrected ratio to the baseline vs paired ratio", s["held_out_raw_ratio_vs_paired"]),
            ("corrected ratio to the baseline vs paired ratio", s["held_out_ratio_vs_paired"])]
    return ("\n\nJudged by deploy's statistic (held-out, paired median of interleaved runs beside the baseline):\n\n"
            "| prediction | within +-10% | MAPE | mean error |\n|---|---|---|---|\n"
            + "\n".join(f"| {name} | {v['within_10pct'] * 100:.0f}% | {v['mape']:.1f}% | {v['mean_err_pct']:+.1f}% |"
                        for name, v in rows))


def _plot(records: list[dict], path: Path, runtime: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    hi = max(max(r["measured_ms"], r["predicted_raw_ms"], r["predicted_ms"]) for r in records) * 1.05
    colors = dict(zip(dict.fromkeys(r["setting"] for r in records), ["tab:blue", "tab:orange", "tab:green"]))
    for ax, key, title in [
        (axes[0], "predicted_raw_ms", "sum of layers"),
        (axes[1], "predicted_ms", "corrected"),
    ]:
        line = np.array([0, hi])
        ax.plot(line, line, "k-", lw=0.8)
        ax.fill_between(line, line * 0.9, line * 1.1, color="0.85", label="+-10%")
        for split, marker in [("fit", "o"), ("held-out", "^")]:
            for setting, color in colors.items():
                pts = [r for r in records if r["split"] == split and r["setting"] == setting]
                ax.scatter(
                    [r["measured_ms"] for r in pts],
                    [r[key] for r in pts],
                    s=18,
                    marker=marker,
                    c=color,
                    label=f"{setting} ({split})",
                )
        ax.set(title=title, xlabel=f"measured whole model, {runtime} (ms)", xlim=(0, hi), ylim=(0, hi))
    axes[0].set_ylabel("predicted from the per-layer table (ms)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
