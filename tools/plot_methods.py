"""Plot a methods benchmark (tools/bench_methods.py's JSON) as top-1 against measured ms, one point per method with
error bars over seeds, the controls' front dashed, every point on one time axis (its paired ratio to the baseline
times one reference baseline ms; absolute ms from different pairs drift with the machine's load).
Run: python tools/plot_methods.py benchmarks/methods_latency.json   (writes benchmarks/methods_latency.png)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgecompact.errors import ConfigError, UserError
from edgecompact.report import plot_seeds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", type=Path, help="a methods benchmark JSON")
    p.add_argument("--out", type=Path, default=None, help="PNG (default: next to the JSON)")
    a = p.parse_args(argv)
    try:
        doc = json.loads(a.bench.read_text())
        doc["results"][0]["name"]
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ConfigError(f"{a.bench}: not a methods benchmark JSON with results") from None
    out = plot_seeds(doc, a.out or a.bench.with_suffix(".png"))
    if out is None:
        raise ConfigError(f"{a.bench}: no row was timed beside the baseline (run the bench with --measure-runs)")
    print(out)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
