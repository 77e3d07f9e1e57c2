"""Roofline latency estimate for a target that has no measured table.

Per layer: max(FLOPs / peak GFLOP/s, bytes moved / peak GB/s), from the target's TOML peak figures. It is an
estimate and says so: the tables it builds carry `source = "roofline-estimate"`, and reports print
their label.
It must not be presented as a measurement.
"""

from __future__ import annotations

from edgecompact.cost.latency import Entry, LatencyTable, LayerKey, layer_grid
from edgecompact.structure import Structure
from edgecompact.targets import Target

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}


def roofline_ms(key: LayerKey, c_in: int, c_out: int, peak_gflops: float, peak_gbps: float) -> float:
    """Roofline time of one conv/linear layer: FLOPs = 2 x MACs; bytes = input + weights + output."""
    (kh, kw), (ih, iw), (oh, ow) = key.kernel, key.in_hw, key.out_hw
    c_in = key.in_channels(c_in, c_out)
    per_out = c_in // key.conv_groups(c_out) * kh * kw
    flops = 2.0 * per_out * c_out * oh * ow
    elements = c_in * ih * iw + per_out * c_out + c_out * oh * ow
    seconds = max(
        flops / (peak_gflops * 1e9), elements * BYTES_PER_ELEMENT[key.precision] / (peak_gbps * 1e9)
    )
    return seconds * 1e3


def roofline_table(structure: Structure, target: Target) -> LatencyTable:
    """A LatencyTable of roofline estimates on the same grid a profile of `structure` would measure."""
    table = LatencyTable.new(
        target,
        "roofline-estimate",
        space=structure.model_name,
        peak_gflops=target.peak_gflops,
        peak_gbps=target.peak_gbps,
    )
    for key, (c_in, c_out) in layer_grid(structure, target.precision, target.channel_multiple).items():
        entry = Entry.empty(c_in, c_out)
        for i, j, ci, co in entry.points():
            entry.ms[i][j] = roofline_ms(key, ci, co, target.peak_gflops, target.peak_gbps)
        table.entries[key] = entry
    return table
