"""An emulated aarch64 Python on this machine (qemu-user): runs a Raspberry Pi artifact's board runner here.

A check of correctness, not of Pi speed. The sysroot and wheels come from tools/setup-aarch64-sysroot.sh;
this module only builds the command line and never installs anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgecompact.errors import DeployError

ROOT_ENV = "EDGECOMPACT_AARCH64_ROOT"
PYTHON = "usr/bin/python3.11"


def aarch64_root() -> Path:
    """The directory holding sysroot/ and site/: $EDGECOMPACT_AARCH64_ROOT or ~/.cache/edgecompact/aarch64."""
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "edgecompact" / "aarch64")


def qemu_python_cmd(*args: str, root: Path | None = None) -> list[str]:
    """The command that runs `python3.11 *args` for aarch64 under qemu-aarch64, with the TVM runtime only.

    Its path holds the aarch64 wheels and the directory above this package, so `-m edgecompact.run` imports;
    the host's user site-packages are left out. Raises DeployError when the sysroot is missing.
    """
    root = aarch64_root() if root is None else Path(root)
    sysroot, python = root / "sysroot", root / "sysroot" / PYTHON
    if not python.is_file():
        raise DeployError(f"{python}: no aarch64 Python (run tools/setup-aarch64-sysroot.sh)")
    path = os.pathsep.join([str(root / "site"), str(Path(__file__).resolve().parents[2])])
    env = {"TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": path, "PYTHONNOUSERSITE": "1"}
    return ["qemu-aarch64", "-L", str(sysroot), *(a for k, v in env.items() for a in ("-E", f"{k}={v}")),
            str(python), *args]
