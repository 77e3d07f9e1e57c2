"""Board-side runner of a deploy artifact: `python -m edgecompact.run ARTIFACT --input x.npy [--output y.npy]`.

Needs only the TVM runtime and numpy (it also works copied alone as `run.py`): it must never import torch,
and it hides torch before importing TVM, since tvm_ffi imports torch whenever it can. It checks the
library's sha256 and the input's shape and dtype against manifest.json before running.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import json
import sys
import time
from pathlib import Path
from typing import Any

try:
    from edgecompact.errors import DeployError
except ImportError:  # copied alone onto a board
    class DeployError(Exception):  # type: ignore[no-redef]
        """An artifact or input that cannot be run."""


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is hidden in this process")


def hide_torch() -> None:
    """Make `import torch` fail in this process (an import hook, so scipy's optional torch probe still works)."""
    if not any(isinstance(f, _NoTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTorch())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / "manifest.json"
    if not path.is_file():
        raise DeployError(f"{path}: manifest not found (not a deploy artifact directory)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeployError(f"{path}: malformed manifest: {e}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DeployError(f"{path}: malformed manifest: {problem}")
    return manifest


# key -> type of what every manifest holds (deploy/artifact.py writes them); checked before anything is run
MANIFEST_KEYS = {"target": dict, "precision": str, "library": str, "sha256": str, "onnx": str, "input": dict}


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a hand-edited manifest, or None."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    shape, dtype = manifest["input"].get("shape"), manifest["input"].get("dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        return "'input.shape' is not a list of positive integers"
    if not isinstance(dtype, str):
        return "'input.dtype' is missing or not a str"
    return None


def check_input(manifest: dict[str, Any], x: Any, where: str) -> None:
    want_shape, want_dtype = tuple(manifest["input"]["shape"]), manifest["input"]["dtype"]
    if tuple(x.shape) != want_shape or str(x.dtype) != want_dtype:
        raise DeployError(f"{where}: input is {x.dtype!s}{list(x.shape)}, the artifact expects "
                          f"{want_dtype}{list(want_shape)}")


def run(artifact: Path, x: Any, *, repeat: int = 0) -> tuple[Any, list[float]]:
    """Run the artifact's TVM library on `x` (numpy). Returns the output and `repeat` latencies in ms."""
    hide_torch()
    import tvm
    from tvm.runtime.vm import VirtualMachine  # not tvm.relax: a board may have only the TVM runtime library

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    lib = artifact / manifest["library"]
    if not lib.is_file():
        raise DeployError(f"{lib}: library not found")
    if sha256(lib) != manifest["sha256"]:
        raise DeployError(f"{lib}: sha256 does not match manifest.json (corrupt or replaced library)")
    dev = tvm.device(manifest.get("device", "cpu"), 0)
    vm = VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
    inp = tvm.runtime.tensor(x, dev)
    out = vm["main"](inp)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        vm["main"](inp)
        dev.sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return out.numpy(), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgecompact.run", description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="artifact directory (manifest.json + library)")
    ap.add_argument("--input", type=Path, required=True, help=".npy file with the input batch")
    ap.add_argument("--output", type=Path, help="write the output here (.npy)")
    ap.add_argument("--repeat", type=int, default=0, help="also time this many runs and print the median")
    args = ap.parse_args(argv)
    try:
        import numpy as np

        if not args.input.is_file():
            raise DeployError(f"{args.input}: input file not found")
        x = np.load(args.input)
        check_input(load_manifest(args.artifact), x, str(args.input))
        y, times = run(args.artifact, x, repeat=args.repeat)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        np.save(args.output, y)
    print(f"output {y.dtype}{list(y.shape)} argmax {np.argmax(y.reshape(y.shape[0], -1), axis=1).tolist()}")
    if times:
        print(f"latency median {float(np.median(times)):.3f} ms over {len(times)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
