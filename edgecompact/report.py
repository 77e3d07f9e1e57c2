"""Reports: the paper-style table (Markdown + JSON in the format of BENCHMARKS.md) and the plots made from it.

Reads records that other stages produced; measures nothing itself.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

from edgecompact import __version__
from edgecompact.errors import ConfigError
from edgecompact.storage import write_text_atomic


def machine() -> str:
    """'x86_64 <CPU model> (<ISA extensions>, <fp32 lanes>), <cores> cores, <GiB>, <GPU or no GPU>': numbers
    are only comparable with the CPU and ISA they came from."""
    import torch

    from edgecompact.cpu import host_cpu

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {host_cpu().describe()}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}"


def source_commit(root: Path) -> str:
    """The code behind a benchmark row: HEAD of the checkout at `root` (12 hex digits), "+dirty" when its package
    or tools differ from HEAD; "unknown" outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "edgecompact", "tools") else "")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"edgecompact": __version__, "torch": torch.__version__.split("+")[0]}
    for key, dist in (("tvm", "apache-tvm"), ("onnxruntime", "onnxruntime")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "not installed"
    return out


def result_record(name: str, spec, metrics: dict, target: str, latency_source: str) -> dict:
    """One BENCHMARKS.md record from a method's metrics; the latency source is named next to a predicted ms."""
    rec = {"name": name, "model": spec.model, "dataset": spec.data.split(":")[0]}
    for key in ("mflops", "params", "top1", "precision", "top1_runtime", "top1_proxy", "top1_fp32", "int8", "budget",
                "wall_s", "widths", "measured_speedup", "final", "final_val_top1"):
        if key in metrics and not (name == "baseline" and key == "budget"):
            rec[key] = metrics[key]
    lat = dict(metrics.get("latency_ms", {}))
    if "predicted" in lat:
        rec["latency_ms"] = {"predicted": lat["predicted"]}
        rec["latency_source"] = f"{target}: {latency_source}"
    return rec


def bench_document(benchmark: str, command: str, protocol: str, results: list[dict]) -> dict:
    return {"benchmark": benchmark, "command": command, "machine": machine(), "date": date.today().isoformat(),
            "versions": versions(), "protocol": protocol, "results": results}


_COLUMNS = [("name", "method"), ("model", "model"), ("dataset", "dataset"), ("mflops", "MFLOPs"),
            ("params", "params"), ("top1", "top-1 %"), ("final", "final training"), ("precision", "precision (top-1 by)"),
            ("top1_proxy", "proxy top-1 %"), ("top1_fp32", "fp32 top-1 %"), ("budget_error", "budget error %"),
            ("predicted_ms", "predicted ms"), ("measured_ms", "measured ms"), ("speedup", "speedup"),
            ("wall_s", "wall s")]


def _fastest(rec: dict) -> str | None:
    """The runtime key of a record's fastest measured ms (None when nothing was measured)."""
    lat = rec.get("latency_ms", {})
    measured = {k: v for k, v in lat.items() if k != "predicted" and not k.endswith("-baseline")}
    return min(measured, key=measured.get) if measured else None


def _flat(rec: dict, baseline: dict | None, prefer: str | None = None) -> dict:
    row = {k: rec.get(k) for k in ("name", "model", "dataset", "mflops", "params", "top1", "top1_proxy",
                                   "top1_fp32", "final", "wall_s")}
    if rec.get("precision"):  # below fp32, say whose top-1 it is: the runtime's own, or the proxy's (older rows)
        row["precision"] = f"{rec['precision']} ({rec.get('top1_runtime', 'fake-quant proxy')})"
    if "budget" in rec:
        row["budget_error"] = rec["budget"].get("error_pct")
    lat = rec.get("latency_ms", {})
    row["predicted_ms"] = lat.get("predicted")
    # "<key>-baseline" entries are the baseline timed beside this result (the pair behind measured_speedup)
    measured = {k: v for k, v in lat.items() if k != "predicted" and not k.endswith("-baseline")}
    if measured:
        # the baseline row shows the runtime its compacts are timed in, so that the two ms read as one pair
        key = prefer if prefer in measured else min(measured, key=measured.get)
        row["measured_ms"] = f"{measured[key]:.3f} ({key})"
        paired = rec.get("measured_speedup", {})
        if key in paired:  # measured against the baseline timed in the same process: the ratio to trust
            row["speedup"] = f"{paired[key]:.2f}x"
        elif rec is baseline:
            row["speedup"] = "1.00x"
        elif baseline and key in baseline.get("latency_ms", {}):
            row["speedup"] = f"{baseline['latency_ms'][key] / measured[key]:.2f}x (other run)"
    return row


def markdown_table(doc: dict) -> str:
    results = doc["results"]
    baseline = next((r for r in results if r["name"] == "baseline"), None)
    keys = [k for r in results if r is not baseline and (k := _fastest(r))]
    prefer = max(sorted(set(keys)), key=keys.count) if keys else None
    rows = [_flat(r, baseline, prefer if r is baseline else None) for r in results]
    cols = [(k, h) for k, h in _COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = [f"# {doc['benchmark']}", "", f"- command: `{doc['command']}`", f"- machine: {doc['machine']}",
             f"- date: {doc['date']}", f"- protocol: {doc['protocol']}", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r[k]) for k, _ in cols) + " |")
    sources = sorted({r["latency_source"] for r in results if "latency_source" in r})
    if sources:
        lines += ["", "Predicted latency from: " + "; ".join(sources)]
    skipped = sorted({str(r["measured"]) for r in results if r.get("measured")})
    if skipped:
        lines += ["", "Not measured: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def write_bench(path_json: Path, doc: dict) -> None:
    path_json = Path(path_json)
    write_text_atomic(path_json, json.dumps(doc, indent=1))
    write_text_atomic(path_json.with_suffix(".md"), markdown_table(doc))


def write_report(run_dir: Path, records: list[dict], command: str, protocol: str) -> dict:
    doc = bench_document("search", command, protocol, records)
    write_bench(Path(run_dir) / "report.json", doc)
    return doc


def load_records(paths: list[Path]) -> list[dict]:
    """Records from run directories or report/benchmark JSON files; one baseline kept per model+dataset."""
    out, seen = [], set()
    for p in paths:
        p = Path(p)
        f = p / "report.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"{p}: no report.json (not a finished run directory or report file)")
        try:
            results = json.loads(f.read_text())["results"]
            if not isinstance(results, list) or not all(isinstance(r, dict) and "name" in r for r in results):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"{f}: malformed report JSON") from None
        for r in results:
            key = (r.get("name"), r.get("model"), r.get("dataset"))
            if r.get("name") == "baseline" and key in seen:
                continue
            seen.add(key)
            out.append(r)
    return out


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower cost x, higher accuracy y)."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            idx.append(i)
    return idx


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """accuracy vs MFLOPs and vs measured ms (Pareto front marked), and per-group widths of every result
    against the baseline's; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    axes = [("mflops", "MFLOPs", lambda r: r.get("mflops"))]

    ref = reference_ms(records)
    axes.append(("ms", "measured latency (ms)" if ref is None else
                 f"measured ms: paired ratio to the baseline x {ref:.3f} ms (median baseline of the pairs)",
                 lambda r: one_axis_ms(r, ref)))
    for tag, label, get in axes:
        pts = [(get(r), r["top1"], r["name"]) for r in records if get(r) is not None and r.get("top1") is not None]
        if len(pts) < 1:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        front = set(pareto([(x, y) for x, y, _ in pts]))
        for i, (x, y, n) in enumerate(pts):
            ax.scatter(x, y, marker="*" if i in front else "o", s=90 if i in front else 40)
        place_labels(ax, [(x, y) for x, y, _ in pts], [n for _, _, n in pts])
        fr = sorted(pts[i] for i in front)
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "--", lw=0.8, color="gray", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    with_widths = [r for r in records if r.get("widths")]
    base = next((r for r in records if r["name"] == "baseline" and r.get("widths")), None)
    if with_widths:
        groups = list((base or with_widths[0])["widths"])
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups)), 4))
        step = 0.8 / len(with_widths)
        for i, r in enumerate(with_widths):
            ax.bar([g + i * step for g in range(len(groups))], [r["widths"].get(k, 0) for k in groups], step,
                   label=r["name"])
        ax.set_xticks([g + 0.4 - step / 2 for g in range(len(groups))], groups, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("channels")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "widths.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _pairs(rec: dict) -> list[tuple[str, float, float]]:
    """(runtime key, compact ms, baseline ms) of every timing of `rec` taken beside the baseline in one process."""
    lat = rec.get("latency_ms", {})
    return [(k, v, lat[f"{k}-baseline"]) for k, v in lat.items() if f"{k}-baseline" in lat]


def reference_ms(records: list[dict]) -> float | None:
    """One baseline ms for a whole plot: the median of the baselines timed in the pairs (per seed where rows hold
    seeds). Absolute ms from different pairs drift with the machine's load; ratios within a pair do not."""
    import statistics

    base = [b for r in records for x in (r.get("per_seed") or [r]) for _, _, b in _pairs(x)]
    return statistics.median(base) if base else None


def one_axis_ms(rec: dict, ref: float | None) -> float | None:
    """`rec` on the plot's time axis: its paired ratio to the baseline x `ref`; the baseline sits at `ref`. A record
    without a pair keeps its own measured ms (None when it has none)."""
    pairs = _pairs(rec)
    if ref is not None and pairs:
        _, ms, base = min(pairs, key=lambda p: p[1])  # the fastest runtime, as the table reports
        return ref * ms / base
    if ref is not None and rec.get("name") == "baseline":
        return ref
    lat = {k: v for k, v in rec.get("latency_ms", {}).items() if k != "predicted" and not k.endswith("-baseline")}
    return min(lat.values()) if lat else None


def place_labels(ax, points: list[tuple[float, float]], names: list[str], fontsize: int = 8) -> list:
    """Annotate each point with its name where the text box overlaps no other label and no marker: candidates
    around the point at growing distances, the first free one kept (greedy, in display pixels)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marks = [ax.transData.transform(p) for p in points]
    taken, texts = [], []

    def free(box) -> bool:
        if any(box.overlaps(t) for t in taken):
            return False
        return not any(box.x0 - 4 <= mx <= box.x1 + 4 and box.y0 - 4 <= my <= box.y1 + 4 for mx, my in marks)

    offsets = [(dx * r, dy * r) for r in (6, 14, 24, 36, 50) for dx, dy in
               ((1, 0.5), (1, -1.2), (-1, 0.5), (-1, -1.2), (0, 1.2), (0, -2), (1, 2), (-1, 2))]
    for (x, y), name in sorted(zip(points, names), key=lambda t: -t[0][1]):
        for dx, dy in offsets:
            t = ax.annotate(name, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                            ha="left" if dx >= 0 else "right", va="center",
                            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"} if abs(dx) > 14 else None)
            box = t.get_window_extent(renderer)
            if free(box) or (dx, dy) == offsets[-1]:
                taken.append(box)
                texts.append(t)
                break
            t.remove()
    return texts


CONTROL_NAMES = ("uniform", "random", "uniform-scratch", "uniform-depth-scratch")


def plot_seeds(doc: dict, path: Path) -> Path | None:
    """A methods benchmark (rows with `per_seed`) as top-1 against measured ms, on one time axis (`one_axis_ms`):
    each method with error bars over seeds (std of both), the controls' Pareto front dashed, labels apart."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    ref = reference_ms(rows)
    if ref is None:
        return None

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    pts = []
    for r in rows:
        seeds = r.get("per_seed") or [r]
        xs = [one_axis_ms(x, ref) for x in seeds]
        if any(v is None for v in xs):
            continue
        pts.append((r["name"], *stats(xs), *stats([x["top1"] for x in seeds])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, x, xs, y, ys in pts:
        style = ({"marker": "*", "color": "black", "ms": 11} if name == "baseline" else
                 {"marker": "s", "color": "gray", "ms": 6} if name in CONTROL_NAMES else {"marker": "o", "ms": 6})
        ax.errorbar(x, y, xerr=xs, yerr=ys, capsize=3, lw=0.8, **style)
    controls = [(x, y) for name, x, _, y, _ in pts if name in CONTROL_NAMES]
    front = sorted(controls[i] for i in pareto(controls))
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=0.8, label="controls' front")
        ax.legend(loc="lower right", fontsize=8)
    place_labels(ax, [(x, y) for _, x, _, y, _ in pts], [name for name, *_ in pts])
    seeds = sorted({s for r in rows for s in r.get("seeds", [])})
    ax.set_xlabel(f"measured ms: paired ratio to the baseline x {ref:.3f} ms (median baseline of the pairs)")
    ax.set_ylabel(f"top-1 % (mean +- std, seeds {','.join(map(str, seeds))})")
    ax.set_title(doc.get("protocol", "")[:110], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
