"""LatencyTable: measured (or roofline-estimated) layer latency of one target, and predictions from it.

A table holds, per layer kind and shape (op, kernel, stride, dense, depthwise or grouped with its channels
per group, input/output HxW, precision), milliseconds on a grid of (c_in, c_out) widths (one axis for
depthwise and grouped convs, whose c_in follows c_out), interpolated bilinearly.
It records where its numbers come from and refuses to serve another target. It never measures anything:
edgecompact.profiling fills tables, edgecompact.cost.roofline estimates them, edgecompact.cost.model picks
one of the two for a search.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompact.cpu import host_cpu
from edgecompact.errors import ConfigError
from edgecompact.storage import cache_root, write_text_atomic
from edgecompact.structure import Layer, Structure
from edgecompact.targets import RUNTIMES, Target

FORMAT = "edgecompact-latency-table/1"
# Boards' tables (measured over RPC) live in the repository; a target that runs here (the host) is a different machine
# in every session, so its tables live in this user's cache, one folder per CPU (`host_profiles_dir`).
PROFILES_DIR = Path(__file__).resolve().parent.parent.parent / "profiles"
# The search space of every group: these fractions of its baseline width (rounded to the channel multiple).
GRID_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
# BatchNorm costs nothing in what ships: ONNX export in eval mode folds it into the preceding conv.
BATCHNORM_NOTE = "batchnorm folded into the preceding conv (ONNX export, eval mode): 0 ms"


@dataclass(frozen=True)
class LayerKey:
    """What a layer's latency depends on besides its widths."""

    op: str  # "conv2d" | "linear"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    depthwise: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    precision: str
    # (in, out) channels per group of a grouped, non-depthwise conv; None for dense and depthwise layers.
    # Slimming removes whole groups, so these stay fixed and c_in follows c_out.
    per_group: tuple[int, int] | None = None

    @classmethod
    def of(cls, layer: Layer, precision: str, c_in: int = 0, c_out: int = 0) -> LayerKey:
        """The key of `layer`; a grouped conv's needs one of its (c_in, c_out) widths, any (its channels per
        group are the same at every width)."""
        per_group = None
        if layer.op == "conv2d" and layer.groups > 1 and not layer.depthwise:
            if c_in <= 0 or c_out <= 0:
                raise ValueError(f"grouped conv '{layer.name}': its key needs its widths (c_in, c_out)")
            per_out = layer.out_channels // layer.groups
            per_group = (c_in // (c_out // per_out), per_out)
        return cls(
            layer.op,
            tuple(layer.kernel),
            tuple(layer.stride),
            layer.depthwise,
            tuple(layer.in_hw),
            tuple(layer.out_hw),
            precision,
            per_group,
        )

    @property
    def one_axis(self) -> bool:
        """Whether c_in follows c_out (depthwise and grouped convs): the table has a c_out axis only."""
        return self.depthwise or self.per_group is not None

    def conv_groups(self, c_out: int) -> int:
        """The conv's groups at `c_out` output channels: 1 (dense), c_out (depthwise) or whole groups."""
        if self.depthwise:
            return c_out
        if self.per_group is None:
            return 1
        if c_out % self.per_group[1]:
            raise ValueError(f"{self}: {c_out} output channels are not whole groups of {self.per_group[1]}")
        return c_out // self.per_group[1]

    def in_channels(self, c_in: int, c_out: int) -> int:
        """The input channels at (c_in, c_out): `c_in`, unless c_in follows c_out (`one_axis`)."""
        if self.depthwise:
            return c_out
        return self.conv_groups(c_out) * self.per_group[0] if self.per_group else c_in

    def __str__(self) -> str:
        if self.op == "linear":
            return f"linear {self.precision}"
        k, s, i, o = self.kernel, self.stride, self.in_hw, self.out_hw
        if self.per_group:
            kind = f"g{self.per_group[0]}x{self.per_group[1]}"
        else:
            kind = "dw" if self.depthwise else "dense"
        return f"conv2d k{k[0]}x{k[1]} s{s[0]}x{s[1]} {kind} {i[0]}x{i[1]}->{o[0]}x{o[1]} {self.precision}"

    @classmethod
    def parse(cls, text: str) -> LayerKey:
        parts = text.split()
        if parts[0] == "linear" and len(parts) == 2:
            return cls("linear", (1, 1), (1, 1), False, (1, 1), (1, 1), parts[1])
        grouped = len(parts) == 6 and re.fullmatch(r"g[1-9]\d*x[1-9]\d*", parts[3])
        if parts[0] != "conv2d" or len(parts) != 6 or not (grouped or parts[3] in ("dw", "dense")):
            raise ValueError(f"not a layer key: {text!r}")
        i, o = parts[4].split("->")
        return cls(
            "conv2d",
            _pair(parts[1][1:]),
            _pair(parts[2][1:]),
            parts[3] == "dw",
            _pair(i),
            _pair(o),
            parts[5],
            _pair(parts[3][1:]) if grouped else None,
        )


@dataclass
class Entry:
    """Latency grid of one LayerKey. Depthwise and grouped convs have `c_in == []` (c_in follows c_out)."""

    c_in: list[int]
    c_out: list[int]
    ms: list[
        list[float | None]
    ]  # ms[i][j] at (c_in[i], c_out[j]); one row when c_in follows c_out; None = not measured

    @classmethod
    def empty(cls, c_in: list[int], c_out: list[int]) -> Entry:
        return cls(list(c_in), list(c_out), [[None] * len(c_out) for _ in range(max(1, len(c_in)))])

    def points(self) -> list[tuple[int, int, int, int]]:
        """(i, j, c_in, c_out) of every grid point; without a c_in axis, c_in == c_out (the key's
        `in_channels` says what c_in follows c_out to)."""
        rows = self.c_in or [None]
        return [
            (i, j, ci if ci is not None else co, co)
            for i, ci in enumerate(rows)
            for j, co in enumerate(self.c_out)
        ]


@dataclass
class LatencyTable:
    """Per-layer latency of one target. `provenance` says where the numbers come from (see `new`)."""

    provenance: dict[str, Any]
    entries: dict[LayerKey, Entry] = field(default_factory=dict)
    # whole-model correction fitted by tools/bench_predictor.py:
    # model_ms = scale * sum_of_layers + per_layer_ms * layers + offset_ms (per_layer_ms optional, default 0:
    # each layer measured alone pays a runtime's per-call overhead that a whole model pays once)
    correction: dict[str, Any] = field(
        default_factory=lambda: {"scale": 1.0, "offset_ms": 0.0, "fitted_on": None}
    )
    path: Path | None = None

    @classmethod
    def new(cls, target: Target, source: str, **provenance: Any) -> LatencyTable:
        """An empty table for `target`; `source` is "measured" or "roofline-estimate"."""
        if source not in ("measured", "roofline-estimate"):
            raise ValueError(f"source must be 'measured' or 'roofline-estimate', not {source!r}")
        prov = {
            "target": target.name,
            "device": target.description,
            "precision": target.precision,
            "channel_multiple": target.channel_multiple,
            "source": source,
            "batchnorm": BATCHNORM_NOTE,
        }
        prov.update(provenance)
        return cls(provenance=prov)

    @property
    def target(self) -> str:
        return self.provenance["target"]

    @property
    def is_estimate(self) -> bool:
        return self.provenance.get("source") == "roofline-estimate"

    @property
    def runtime(self) -> str | None:
        """The runtime a measured table timed ("tvm" | "onnxruntime"; tables older than the key: "tvm");
        None for an estimate."""
        if self.is_estimate:
            return None
        runtime = str(self.provenance.get("runtime", "tvm"))
        return runtime if runtime in RUNTIMES else "tvm"

    @property
    def label(self) -> str:
        """How reports name this table's numbers: the target, and "(roofline estimate)" when not measured,
        else the runtime it measured."""
        if self.is_estimate:
            return f"{self.target} (roofline estimate)"
        return f"{self.target} (measured, {self.runtime})"

    def check_target(self, target: Target) -> None:
        """Raise ConfigError unless this table was made for `target` (tables are never mixed), and, for a target
        that runs here, measured on this CPU."""
        where = self.path or "latency table"
        if self.target != target.name:
            raise ConfigError(f"{where}: table is for target '{self.target}', not '{target.name}'")
        if self.provenance.get("precision", target.precision) != target.precision:
            raise ConfigError(
                f"{where}: table precision is '{self.provenance['precision']}', "
                f"target '{target.name}' uses '{target.precision}'"
            )
        if target.runnable_here:
            self.check_cpu()

    def check_cpu(self) -> None:
        """Raise ConfigError if this table was measured locally on another CPU than this one (or on a CPU it does
        not record): its milliseconds are that machine's."""
        key, where = self.provenance.get("cpu_key"), self.path or "latency table"
        local = str(self.provenance.get("where", "")).startswith("local")
        if key is None and not local:
            return  # measured over RPC on a board, or built by hand: not this CPU's to check
        here = host_cpu()
        if key != here.key:
            measured_on = self.provenance.get("cpu") or "a CPU it does not record"
            raise ConfigError(
                f"{where}: measured on {measured_on}, not on this CPU ({here.describe()}); profile this one "
                f"(`edgecompact profile --target {self.target} --model {self.provenance.get('space', 'MODEL')}`)"
            )

    # -- lookup ------------------------------------------------------------------------------------------

    def layer_ms(self, layer: Layer, c_in: int, c_out: int) -> float:
        """Latency of `layer` at these widths: bilinear between grid points, linear (clamped >= 0) outside."""
        if layer.op == "batchnorm":
            return 0.0
        key = LayerKey.of(layer, self.provenance.get("precision", "fp32"), c_in, c_out)
        entry = self.entries.get(key)
        where = self.path or "latency table"
        if entry is None:
            raise ConfigError(
                f"{where}: no entry for layer '{layer.name}' ({key}); profile this model for "
                f"target '{self.target}'"
            )
        if any(v is None for row in entry.ms for v in row):
            raise ConfigError(
                f"{where}: entry '{key}' is incomplete; re-run `edgecompact profile` to resume it"
            )
        if not entry.c_in:
            return _interp1(entry.c_out, entry.ms[0], c_out)
        column = [_interp1(entry.c_out, row, c_out) for row in entry.ms]
        return _interp1(entry.c_in, column, c_in)

    def predict(self, structure: Structure, widths: dict[str, int], *, corrected: bool = True) -> float:
        """Predicted latency (ms) of `structure` at `widths`: the sum over conv and linear layers (BN folded),
        then the table's whole-model correction unless `corrected` is False."""
        times = [  # a layer with no input or output channel is gone (a removed residual block)
            self.layer_ms(layer, c_in, c_out)
            for layer, c_in, c_out in structure.channels(widths)
            if layer.op != "batchnorm" and c_in and c_out
        ]
        if not corrected:
            return sum(times)
        c = self.correction
        return c["scale"] * sum(times) + c.get("per_layer_ms", 0.0) * len(times) + c["offset_ms"]

    def marginal_latency(self, structure: Structure, widths: dict[str, int], group: str) -> float:
        """ms saved per channel removed from `group` at `widths` (one channel_multiple step, finite diff.).

        Clamped at >= 0: measurement noise must never make a channel look like it costs negative time.
        """
        step = int(self.provenance.get("channel_multiple", 1))
        width = widths[group]
        lo, hi = (width - step, width) if width - step >= 1 else (width, width + step)
        saved = self.predict(structure, {**widths, group: hi}) - self.predict(
            structure, {**widths, group: lo}
        )
        return max(0.0, saved / (hi - lo))

    # -- files -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "provenance": self.provenance,
            "correction": self.correction,
            "entries": {
                str(k): {"c_in": e.c_in, "c_out": e.c_out, "ms": e.ms} for k, e in self.entries.items()
            },
        }

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename): a killed process or a full disk (StorageError) leaves the previous
        complete file."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))
        self.path = path

    @classmethod
    def load(cls, path: Path, target: Target | None = None) -> LatencyTable:
        """Read a table; with `target`, also check it was made for that target."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: latency table not found")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            prov = dict(raw["provenance"])
            for key in ("target", "source"):
                if not isinstance(prov.get(key), str):
                    raise TypeError(f"provenance.{key} missing")
            if "channel_multiple" in prov:
                prov["channel_multiple"] = int(prov["channel_multiple"])
            entries = {}
            for text, e in raw["entries"].items():
                entry = Entry(
                    [int(c) for c in e["c_in"]],
                    [int(c) for c in e["c_out"]],
                    [[None if v is None else float(v) for v in row] for row in e["ms"]],
                )
                if len(entry.ms) != max(1, len(entry.c_in)) or any(
                    len(r) != len(entry.c_out) for r in entry.ms
                ):
                    raise ValueError(f"entry '{text}': ms grid does not match its axes")
                entries[LayerKey.parse(text)] = entry
            correction = dict(raw.get("correction") or {"scale": 1.0, "offset_ms": 0.0, "fitted_on": None})
            for key in ("scale", "offset_ms") + (("per_layer_ms",) if "per_layer_ms" in correction else ()):
                correction[key] = float(correction[key])
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
        ) as e:
            raise ConfigError(f"{path}: malformed latency table ({type(e).__name__}: {e})") from None
        table = cls(provenance=prov, entries=entries, correction=correction, path=path)
        if target is not None:
            table.check_target(target)
        return table


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split("x")
    return int(a), int(b)


def _interp1(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys): exact at xs, linear between; outside, the edge segment's slope
    (never negative), clamped at >= 0. A single point scales proportionally with x."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    slope = (y1 - y0) / (x1 - x0)
    if x < x0 or x > x1:
        slope = max(slope, 0.0)
    base = y0 if x <= x1 else y1
    return max(0.0, base + slope * (x - (x0 if x <= x1 else x1)))


def width_grid(full: int, multiple: int = 1, fixed: int = 0) -> list[int]:
    """Grid widths of a channel count whose searchable part is `full - fixed` (fixed: image channels).

    With a channel multiple every width the search can choose is on the grid (no interpolation across a kernel's
    step); without one, GRID_FRACTIONS of the width."""
    free = full - fixed
    if free <= 0:
        return [full]
    step = multiple if free > multiple else 1
    if step > 1:
        return sorted({fixed + min(free, w) for w in range(step, free + step, step)})
    return sorted(
        {fixed + max(step, min(free, step * math.ceil(f * free / step - 1e-9))) for f in GRID_FRACTIONS}
    )


def group_grid(c_out: int, per_group: int, multiple: int = 1) -> list[int]:
    """Grid widths of a grouped conv's `c_out` output channels, in whole groups of `per_group` (slimming
    removes whole groups): with a channel multiple, every width that is a multiple of both; without one,
    GRID_FRACTIONS of its groups."""
    groups = c_out // per_group
    if multiple > 1:
        step = math.lcm(multiple, per_group) // per_group
        return sorted({per_group * min(groups, n) for n in range(step, groups + step, step)})
    return [per_group * n for n in width_grid(groups)]


def layer_grid(
    structure: Structure, precision: str, multiple: int = 1
) -> dict[LayerKey, tuple[list[int], list[int]]]:
    """(c_in axis, c_out axis) of every distinct layer kind of `structure`'s search space.

    Layers sharing a kind share one grid (the union of their axes). Depthwise and grouped convs get an empty
    c_in axis; a grouped conv's c_out axis is whole groups (`group_grid`).
    """
    axes: dict[LayerKey, tuple[set[int], set[int]]] = {}
    for layer, c_in, c_out in structure.channels(structure.baseline_widths()):
        if layer.op == "batchnorm":
            continue
        key = LayerKey.of(layer, precision, c_in, c_out)
        fixed_in = sum(p * m for p, m in zip(layer.in_parts, layer.in_multiplier) if not isinstance(p, str))
        mult_in = max(
            [m for p, m in zip(layer.in_parts, layer.in_multiplier) if isinstance(p, str)], default=1
        )
        ins = set() if key.one_axis else set(width_grid(c_in, multiple * mult_in, fixed_in))
        if not layer.out_groups:
            outs = {c_out}
        elif key.per_group:
            outs = set(group_grid(c_out, key.per_group[1], multiple))
        else:
            outs = set(width_grid(c_out, multiple))
        got = axes.setdefault(key, (set(), set()))
        got[0].update(ins)
        got[1].update(outs)
    return {k: (sorted(i), sorted(o)) for k, (i, o) in axes.items()}


def host_profiles_dir() -> Path:
    """This CPU's folder of latency tables in the user's cache: <cache>/profiles/<cpu key>."""
    return cache_root() / "profiles" / host_cpu().key


def default_table_path(target: Target, space: str, directory: Path | None = None) -> Path:
    """<directory>/<target>-<precision>-<space>-m<channel multiple>.json; `directory` defaults to this CPU's cache
    folder for a target that runs here, else the repository's profiles/ (boards, measured over RPC)."""
    if directory is None:
        directory = host_profiles_dir() if target.runnable_here else PROFILES_DIR
    return Path(directory) / f"{target.name}-{target.precision}-{space}-m{target.channel_multiple}.json"
