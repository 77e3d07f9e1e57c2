"""Precision: the search's fast proxies (int8 fake quantization, torch in half) against onnxruntime's own top-1 of
the model deploy ships, per CPU, with and without reduce_range.

Writes benchmarks/precision.json + precision.md (BENCHMARKS.md format).
Run: python tools/bench_precision.py [--models resnet20@16,resnet32@32] [--emulate EPYC-Rome]
Each model is trained briefly on digits here, exported and quantized once (both settings), and its files are run by
onnxruntime on this CPU and, with --emulate, under qemu-user's x86-64 emulation of that CPU model (AVX2, no VNNI,
no AVX-512: onnxruntime's MLAS dispatches on CPUID, so it takes that CPU's kernels), int8 only. Emulated rows are
functional only: they say what that ISA's kernels compute, not how fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = (False, True)  # reduce_range


def ort_worker(work: Path, tag: str) -> None:
    """Runs inside the (possibly emulated) process: onnxruntime logits of every model file, and this CPU's facts."""
    from edgecompact.cpu import host_cpu, int8_scheme
    from edgecompact.deploy.onnx import INPUT_NAME, session, u8s8_saturates

    out: dict[str, np.ndarray] = {}
    # fp16 under TCG takes ~8 s per image (ResNet-32 at 32x32: no F16C fast path), so emulated runs are int8 only
    for f in sorted(f for f in work.glob("*/*.onnx") if f.stem.startswith("int8") or f.stem == "fp16" and tag == "native"):
        x = np.load(f.parent / "x.npy")
        sess = session(f)
        out[f"{f.parent.name}/{f.stem}"] = np.concatenate(
            [sess.run(None, {INPUT_NAME: x[i:i + 1]})[0] for i in range(len(x))])
    np.savez(work / f"logits-{tag}.npz", **out)
    cpu = host_cpu()
    facts = {"cpu": cpu.to_dict(), "describe": cpu.describe(), "ort_u8s8_saturates": u8s8_saturates(),
             "isa_reduce_range": int8_scheme(cpu).reduce_range}
    (work / f"cpu-{tag}.json").write_text(json.dumps(facts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20@16,resnet32@32", help="model@input-size, comma-separated")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--emulate", default="", help="also run under qemu-x86_64 -cpu MODEL (e.g. EPYC-Rome)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "precision.json")
    ap.add_argument("--ort-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="native", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ort_worker:
        ort_worker(a.ort_worker, a.tag)
        return

    import torch

    from edgecompact.cpu import Int8Scheme
    from edgecompact.data import load_dataset
    from edgecompact.deploy.onnx import ship_onnx, to_fp16
    from edgecompact.models import create_model
    from edgecompact.precision import at_precision, calibration_inputs
    from edgecompact.report import bench_document
    from edgecompact.train import TrainConfig, train

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    proxies: dict[str, dict] = {}
    for spec in a.models.split(","):
        name, size = spec.split("@")
        data = load_dataset("digits", input_size=int(size))
        torch.manual_seed(0)
        model = create_model(name, num_classes=data.num_classes, in_channels=data.in_channels,
                             input_size=data.input_size)
        t0 = time.perf_counter()
        train(model, data.train, TrainConfig(epochs=a.epochs, lr=0.05, batch_size=64, progress=False))
        model.eval()
        x, y = data.test.tensors
        calib = calibration_inputs(data.train)
        key = f"{name}-digits{size}"
        (work / key).mkdir()
        np.save(work / key / "x.npy", x.numpy())
        shape = (1, *x.shape[1:])
        for rr in SETTINGS:
            path = work / key / f"int8-rr{int(rr)}.onnx"
            ship_onnx(model, shape, "int8", path, calib=calib.numpy(), scheme=Int8Scheme(rr))
            shutil.move(path.with_suffix(".fp32.onnx"), work / key / "fp32.onnx")
        to_fp16(work / key / "fp32.onnx", work / key / "fp16.onnx")
        with torch.no_grad():
            proxies[key] = {"y": y.numpy(), "fp32": model(x).numpy(), "train_s": time.perf_counter() - t0,
                            "fp16": at_precision(model, "fp16")(x).numpy()}
            for rr in SETTINGS:
                proxies[key][f"int8-rr{int(rr)}"] = at_precision(model, "int8", calib, Int8Scheme(rr))(x).numpy()
        print(f"{key}: trained and exported ({time.perf_counter() - t0:.0f} s)", flush=True)

    runs = [("native", [sys.executable])]
    if a.emulate:
        runs.append((f"emulated-{a.emulate}", ["qemu-x86_64", "-cpu", a.emulate, sys.executable]))
    records = []
    from edgecompact.report import source_commit

    commit = source_commit(ROOT)
    for tag, prefix in runs:
        t0 = time.perf_counter()
        cmd = [*prefix, str(Path(__file__).resolve()), "--ort-worker", str(work), "--tag", tag]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{tag}: onnxruntime worker failed:\n{proc.stderr[-3000:]}")
        logits = np.load(work / f"logits-{tag}.npz")
        facts = json.loads((work / f"cpu-{tag}.json").read_text())
        print(f"{tag}: {facts['describe']}, u8s8 saturates: {facts['ort_u8s8_saturates']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for key, p in proxies.items():
            for variant in ("fp16", *(f"int8-rr{int(rr)}" for rr in SETTINGS)):
                if f"{key}/{variant}" in logits:
                    records.append(_record(key, variant, tag, facts, p, logits[f"{key}/{variant}"], commit))
    for tag, _ in runs:
        rows = [r for r in records if r["cpu_run"] == tag and r.get("chosen_by_isa")]
        records.append({"name": "summary", "cpu_run": tag, "settings": "as chosen by the ISA",
                        "max_abs_top1_diff": max(abs(r["top1_proxy"] - r["top1"]) for r in rows),
                        "min_argmax_agreement": min(r["argmax_agreement"] for r in rows)})
    protocol = (f"models {a.models} trained {a.epochs} epochs on digits (seed 0, 1 torch thread); top-1 on the "
                "359-image test split; int8: deploy's static QDQ (per-channel int8 weights, uint8 activations, "
                "256 calibration images), with reduce_range off and on; fp16: onnxruntime's converter; proxy: "
                "edgecompact.precision (fake quantization / torch in half); onnxruntime 1 thread, batch 1; the "
                "same model files for every CPU run")
    doc = bench_document("precision", "python " + " ".join(["tools/bench_precision.py", *sys.argv[1:]]), protocol,
                         records)
    doc["commit"] = commit
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    a.out.with_suffix(".md").write_text(_markdown(doc))
    shutil.rmtree(work)
    print(a.out.with_suffix(".md").read_text())


def _record(key: str, variant: str, tag: str, facts: dict, p: dict, ort: np.ndarray, commit: str) -> dict:
    model, dataset = key.rsplit("-", 1)
    y, proxy = p["y"], p[variant]
    rec = {"name": f"{key} {variant}", "model": model, "dataset": dataset, "cpu_run": tag,
           "cpu": facts["describe"], "emulated": tag != "native", "precision": variant.split("-")[0],
           "top1_fp32": _top1(p["fp32"], y), "top1": _top1(ort, y), "top1_runtime": "onnxruntime",
           "top1_proxy": _top1(proxy, y), "argmax_agreement": round(float((proxy.argmax(1) == ort.argmax(1)).mean()), 4),
           "logit_mae_proxy_vs_runtime": round(float(np.abs(proxy - ort).mean()), 5),
           "logit_mae_runtime_vs_fp32": round(float(np.abs(ort - p["fp32"]).mean()), 5), "images": len(y),
           "commit": commit, "date": datetime.date.today().isoformat()}
    if variant.startswith("int8"):
        rr = variant.endswith("rr1")
        rec.update(reduce_range=rr, chosen_by_isa=rr == facts["isa_reduce_range"],
                   ort_u8s8_saturates=facts["ort_u8s8_saturates"])
    else:
        rec["chosen_by_isa"] = True
    return rec


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float((logits.argmax(1) == y).mean()), 2)


def _markdown(doc: dict) -> str:
    lines = [f"# {doc['benchmark']}", "", f"- command: `{doc['command']}`", f"- machine: {doc['machine']}",
             f"- date: {doc['date']}, commit {doc['commit']}", f"- protocol: {doc['protocol']}", "",
             "Emulated rows ran under qemu-user (TCG): functional only, the emulated CPU's kernels, not its speed.", "",
             ("| model | precision | reduce_range | CPU run | u8s8 saturates | chosen by ISA | onnxruntime top-1 % "
             "| proxy top-1 % | fp32 top-1 % | argmax agreement | mean abs logit diff (proxy vs runtime) "
             "| mean abs logit shift (runtime vs fp32) |"), "|" + "---|" * 12]
    cpus = {}
    for r in doc["results"]:
        if r["name"] == "summary":
            continue
        cpus[r["cpu_run"]] = r["cpu"]
        rr = "" if "reduce_range" not in r else ("on" if r["reduce_range"] else "off")
        lines.append(f"| {r['model']} {r['dataset']} | {r['precision']} | {rr} | {r['cpu_run']} | "
                     f"{'' if 'ort_u8s8_saturates' not in r else ('yes' if r['ort_u8s8_saturates'] else 'no')} | "
                     f"{'yes' if r['chosen_by_isa'] else 'no'} | {r['top1']} | {r['top1_proxy']} | {r['top1_fp32']} | "
                     f"{r['argmax_agreement']} | {r['logit_mae_proxy_vs_runtime']} | {r['logit_mae_runtime_vs_fp32']} |")
    lines += ["", "CPU runs:"] + [f"- {k}: {v}" for k, v in cpus.items()]
    lines += [""] + [f"Summary, {r['cpu_run']} ({r['settings']}): |proxy - runtime| top-1 at most "
                     f"{r['max_abs_top1_diff']:.2f} points, argmax agreement at least {r['min_argmax_agreement']}."
                     for r in doc["results"] if r["name"] == "summary"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
