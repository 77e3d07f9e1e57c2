"""Structure sweep: random nets of the block grammar (edgecompact/models/grammar.py), each analyzed, slimmed at a
random keep and checked (slim == mask, FLOPs == FlopCounterMode, params, ONNX == torch, torch-pruning agreement).

Writes benchmarks/structure.json and structure.md: how many nets passed each check, and every failure.
    python tools/bench_structure.py --nets 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from edgecompact.errors import ConfigError
from edgecompact.models.grammar import random_net
from edgecompact.report import source_commit
from edgecompact.structure_check import check_net

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("slim_equals_mask", "flops_equal_torch", "params_equal", "onnx_equals_torch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=1000, help="the test suite uses seeds 0-19")
    ap.add_argument("--input-size", type=int, default=8)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/structure.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, start = [], time.time()
    for seed in range(args.first_seed, args.first_seed + args.nets):
        net, kinds = random_net(seed, input_size=args.input_size)
        t = time.time()
        try:
            result = check_net(net, (3, args.input_size, args.input_size), seed, onnx=not args.no_onnx)
        except ConfigError as e:
            result = {"refused": str(e)}
        rows.append({"seed": seed, "blocks": kinds, **result, "wall_s": round(time.time() - t, 2)})
        print(seed, kinds, {k: v for k, v in result.items() if k != "groups"}, flush=True)
    checks = CHECKS[:-1] if args.no_onnx else CHECKS
    analyzed = [r for r in rows if "refused" not in r]
    summary = {"name": "summary", "nets": len(rows), "refused": len(rows) - len(analyzed),
               **{k: sum(bool(r.get(k)) for r in analyzed) for k in checks},
               "torch_pruning_same": sum(r["torch_pruning"] == "same" for r in analyzed),
               "torch_pruning_coarser": sum(r["torch_pruning"] == "coarser" for r in analyzed),
               "torch_pruning_differs": sum(r["torch_pruning"] == "differs" for r in analyzed),
               "all_passed": sum(all(r.get(k) for k in checks) and r["torch_pruning"] != "differs"
                                 for r in analyzed),
               "wall_s": round(time.time() - start, 1)}
    commit = source_commit(ROOT)
    for row in rows:
        row["commit"] = commit
    import torch_pruning

    import edgecompact

    doc = {"benchmark": "structure", "command": "python " + " ".join(sys.argv), "commit": commit,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} thread, no GPU",
           "date": date.today().isoformat(),
           "versions": {"edgecompact": getattr(edgecompact, "__version__", "0.1.0"), "torch": torch.__version__,
                        "torch_pruning": torch_pruning.__version__},
           "protocol": f"{args.nets} random grammar nets (seeds {args.first_seed}+), 3x{args.input_size}x"
                       f"{args.input_size} input, one random keep of half of each group",
           "results": [summary] + rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    lines = [f"# Structure sweep ({doc['date']}, commit {commit})", "", doc["protocol"], "",
             "| check | nets passed |", "|---|---|"]
    lines += [f"| {k} | {summary[k]} / {len(analyzed)} |" for k in (*checks, "all_passed")]
    lines += [(f"| torch-pruning same / coarser / differs | {summary['torch_pruning_same']} / "
               f"{summary['torch_pruning_coarser']} / {summary['torch_pruning_differs']} |"),
              f"| refused (not supported) | {summary['refused']} / {len(rows)} |", ""]
    bad = [r for r in rows if "refused" in r or not all(r.get(k) for k in checks) or r["torch_pruning"] == "differs"]
    lines += [f"- seed {r['seed']} {r['blocks']}: {r.get('refused') or r}" for r in bad]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
