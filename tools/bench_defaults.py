"""Method defaults chosen on the validation split: one option changed per variant, the methods protocol, 3 seeds.

MorphNet's width floor and strength and GenSynth's `train` and `marginal_step` were first chosen on test top-1 (one
seed). Here every variant is one `tools/bench_methods.py --methods M --set M.KEY=VALUE` run of the 1/3-FLOPs
ResNet-20 Fashion-MNIST protocol (final training `best`, no distillation), sharing the baselines of
`runs/bench-methods/`. The choice is the variant with the highest mean *validation* top-1 of the delivered network;
test top-1 is reported beside it and decides nothing. Resumable: each variant's rows live in
runs/bench-defaults/<method>-<variant>.json; the table is rewritten as rows land.
Writes benchmarks/defaults.{json,md}.
Run: python tools/bench_defaults.py --methods morphnet gensynth --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from edgecompact.report import bench_document, source_commit, write_bench

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ["--dataset", "fashion-mnist", "--model", "resnet20", "--input-size", "28", "--limit", "8000",
            "--epochs", "8", "--search-epochs", "2", "--finetune-epochs", "3", "--measure-runs", "0"]
PROTO_TEXT = ("resnet20, fashion-mnist at 28x28, 8000 train+val images, baseline 8 epochs (shared with "
              "tools/bench_methods.py), search 2 + fine-tune 3 epochs, final training best (inherit vs 13-epoch "
              "scratch, chosen on validation), budget flops 1/3x, no distillation; choice: highest mean validation "
              "top-1 over seeds; test top-1 reported only")
# method -> variant -> --set assignments; "default" is the shipped configuration
VARIANTS: dict[str, dict[str, list[str]]] = {
    "morphnet": {"default": [], "strength=0.03": ["strength=0.03"], "strength=0.3": ["strength=0.3"],
                 "min_fraction=0.25": ["min_fraction=0.25"], "min_fraction=0.55": ["min_fraction=0.55"]},
    "gensynth": {"default": [], "train=all": ["train=all"], "marginal_step=8": ["marginal_step=8"],
                 "marginal_step=32": ["marginal_step=32"]},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--variants", nargs="+", default=None, help="variant names to run (default: all of a method's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "defaults.json")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from the finished runs")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the variant runs keep their rows")
    a = ap.parse_args(argv)
    command = "python tools/bench_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for method in a.methods:
        for variant, sets in VARIANTS[method].items():
            if a.table_only or (a.variants and variant not in a.variants):
                continue
            args = [*PROTOCOL, "--methods", method, "--seeds", *map(str, a.seeds),
                    *[x for s in sets for x in ("--set", f"{method}.{s}")], "--out", str(variant_out(a.runs, method, variant))]
            print(f"=== {method} {variant}", flush=True)
            r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_methods.py"), *args], check=False)
            if r.returncode:
                sys.exit(f"error: {method} {variant} failed (exit {r.returncode}); re-run to resume")
            write_table(a.out, command, a.runs)
    write_table(a.out, command, a.runs)
    if a.out.with_suffix(".md").is_file():
        print(a.out.with_suffix(".md").read_text())
    else:
        print("no finished variant yet")


def variant_out(runs: Path, method: str, variant: str) -> Path:
    return runs / "bench-defaults" / f"{method}-{variant.replace('=', '_')}.json"


def write_table(out: Path, command: str, runs: Path) -> None:
    """Collect every finished variant row into one document and its table (mean, std over seeds; the choice)."""
    rows = []
    for method, variants in VARIANTS.items():
        for variant, sets in variants.items():
            path = variant_out(runs, method, variant)
            if not path.is_file():
                continue
            for r in json.loads(path.read_text())["results"]:  # one row per method, its seeds in per_seed
                if r["name"] == method:
                    rows += [{"name": method, **x, "variant": variant, "sets": sets} for x in r["per_seed"]]
    if not rows:
        return
    doc = bench_document("defaults", command, PROTO_TEXT, rows)
    write_bench(out, doc)
    lines = ["# defaults", "", f"- command: `{command}`", f"- machine: {doc['machine']}, {doc['date']}",
             (f"- code: rows' commits {', '.join(sorted({r['commit'] for r in rows}))} (this table: "
             f"{source_commit(ROOT)})"), f"- protocol: {PROTO_TEXT}", "",
             ("| method | variant | seeds | val top-1 % (mean ± std) | test top-1 % (mean ± std) | MFLOPs | "
             "final won | chosen on val |"), "|---|---|---|---|---|---|---|---|"]
    for method, variants in VARIANTS.items():
        sel = {v: [r for r in rows if r["name"] == method and r["variant"] == v] for v in variants}
        sel = {v: rs for v, rs in sel.items() if rs}
        for v, rs in sel.items():
            lines.append(f"| {method} | {v} | {','.join(str(r['seed']) for r in rs)} | {_ms(rs, 'top1_val')} | "
                         f"{_ms(rs, 'top1')} | {statistics.fmean(r['mflops'] for r in rs):.2f} | "
                         f"{'/'.join(r['final'] for r in rs)} | {choice(sel, v)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def choice(sel: dict[str, list[dict]], variant: str) -> str:
    """The verdict on `variant`: the best mean validation top-1 among the variants with every seed changes the
    default only when it beats the default's by more than one std (the larger of the two); else a tie."""
    full = {v: rs for v, rs in sel.items() if len(rs) == max(len(x) for x in sel.values()) and len(rs) > 1}
    if variant not in full or "default" not in full:
        return "" if variant in full or variant == "default" else "(seeds missing)"
    def val(v: str) -> float:
        return statistics.fmean(r["top1_val"] for r in full[v])
    best = max(full, key=val)
    if variant != best:
        return ""
    if best == "default":
        return "**best: default kept**"
    std = max(statistics.stdev(r["top1_val"] for r in full[v]) for v in (best, "default"))
    margin = val(best) - val("default")
    if margin > std:
        return f"**best, beyond one std (+{margin:.2f} > {std:.2f}): new default**"
    return f"best mean, a tie with the default (+{margin:.2f} <= std {std:.2f}): default kept"


def _ms(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


if __name__ == "__main__":
    main()
