"""GenSynth ablation: the methods benchmark's 1/3-FLOPs protocol, GenSynth alone, one design choice changed per row.

Each variant is one `tools/bench_methods.py --methods gensynth` run (resumable) on the shared, already trained
baseline (`runs/bench-methods/<protocol>/baseline.pt`; train it with tools/bench_methods.py first). The rows say
how much each choice is worth and how far single-seed results spread: one seed, so differences under ~0.5 points
are within what a different choice of stimuli or samples moves. Writes benchmarks/gensynth_ablation.{json,md}.
Run: python tools/bench_gensynth.py [--variants default all ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgecompact.report import bench_document, write_bench

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ["--dataset", "fashion-mnist", "--model", "resnet20", "--input-size", "28", "--limit", "8000",
            "--epochs", "8", "--search-epochs", "2", "--finetune-epochs", "3", "--measure-runs", "0"]
BASELINE = ROOT / "runs" / "bench-methods" / "fashion-mnist-resnet20-28-8000-e8-s0" / "baseline.pt"
KD = ["--distill", "0.5"]
# name -> (what changes, extra bench_methods arguments); "default" is the shipped configuration
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("default (train=best, 4 cycles x 4 samples, mimic 0.5); final fine-tune not distilled", []),
    "best-kd": ("default, every fine-tune distilled (the distillation protocol)", KD),
    "best": ("default, no distillation in the final fine-tune nor in the cycles (mimic 0)",
             ["--set", "gensynth.mimic=0"]),
    "all-kd": ("train=all: every sample fine-tuned (the first design)", [*KD, "--set", "gensynth.train=all"]),
    "best-kd9": ("distillation weight 0.9 (cycles and final)", ["--distill", "0.9", "--set", "gensynth.mimic=0.9"]),
    "best-kd-c2": ("2 cycles", [*KD, "--set", "gensynth.cycles=2"]),
    "kd-c6": ("6 cycles", [*KD, "--set", "gensynth.cycles=6"]),
    "kd-s8": ("8 samples per cycle", [*KD, "--set", "gensynth.samples=8"]),
    "kd-s8-t1": ("8 samples, Gumbel temperature 1.0", [*KD, "--set", "gensynth.samples=8", "--set",
                                                        "gensynth.temperature=1.0"]),
    "kd-top1": ("U = top-1 instead of NetScore", [*KD, "--set", "gensynth.utility=top1"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "gensynth-ablation")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gensynth_ablation.json")
    a = ap.parse_args()
    if not BASELINE.is_file():
        sys.exit(f"error: {BASELINE} missing: run tools/bench_methods.py {' '.join(PROTOCOL[:-2])} first")
    results = []
    for name in a.variants:
        what, extra = VARIANTS[name]
        work = a.work_dir / name
        work.mkdir(parents=True, exist_ok=True)
        link = work / "baseline.pt"
        if not link.exists():
            link.symlink_to(BASELINE)
        args = [*PROTOCOL, "--methods", "gensynth", *extra, "--work-dir", str(work), "--out", str(work / "out.json")]
        print(f"=== {name}: {what}", flush=True)
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_methods.py"), *args], check=False)
        if r.returncode:
            sys.exit(f"error: variant {name} failed (exit {r.returncode}); re-run to resume")
        doc = json.loads((work / "out.json").read_text())
        base = next(x for x in doc["results"] if x["name"] == "baseline")
        rec = next(x for x in doc["results"] if x["name"] == "gensynth")
        results.append({**rec, "name": "gensynth", "variant": name, "change": what, "drop": round(base["top1"] -
                        rec["top1"], 2), "args": " ".join(extra), "baseline_top1": base["top1"]})
    command = "python tools/bench_gensynth.py " + " ".join(sys.argv[1:])
    proto = ("resnet20, fashion-mnist at 28x28, 8000 train+val images, baseline 8 epochs lr 0.05 (shared checkpoint); "
             "search 2 + fine-tune 3 epochs (lr 0.01, batch 128); budget flops 0.33x; seed 0; one run per variant")
    doc = bench_document("gensynth_ablation", command, proto, results)
    write_bench(a.out, doc)
    lines = ["# gensynth_ablation", "", f"- command: `{command}`", f"- machine: {doc['machine']}, {doc['date']}",
             f"- protocol: {proto}", "", ("| variant | change | bench_methods arguments | MFLOPs | params | top-1 % | "
             "drop | wall s |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['change']} | `{r['args'] or '(none)'}` | {r['mflops']} | {r['params']} "
                     f"| {r['top1']} "
                     f"| {r['drop']} | {r['wall_s']} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
