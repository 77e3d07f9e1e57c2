"""edgecompact: hardware-aware compact architecture search and compilation for CNNs on edge devices."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load_compact(run_dir: str | Path) -> nn.Module:
    """The compact model of a finished `edgecompact search` run directory: a plain `torch.nn.Module` in eval mode,
    rebuilt from config.json, structure.json and arch.json, with the weights the search wrote."""
    from edgecompact.pipeline import load_compact as load

    return load(Path(run_dir))[0]
