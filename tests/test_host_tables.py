"""Host latency tables are this machine's: the channel multiple comes from its CPU, a table records the CPU it was
measured on and is refused on any other, and a latency search builds one on first use in the user's cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgecompact.cost.latency import (
    PROFILES_DIR,
    LatencyTable,
    default_table_path,
    host_profiles_dir,
    width_grid,
)
from edgecompact.cost.model import latency_model
from edgecompact.cpu import Cpu, host_cpu
from edgecompact.errors import ConfigError
from edgecompact.pipeline import search_multiple
from edgecompact.structure import analyze
from edgecompact.targets import Target, get_target, load_target_file

# torch's own dispatch level, read independently of edgecompact.cpu's CPUID reader
TORCH_LANES = {"AVX512": 16, "AVX2": 8}


class Tiny(nn.Module):
    """Two convs and a linear at 8x8: a search space profiled in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def test_host_channel_multiple_is_this_cpus_fp32_lanes():
    host = get_target("host")
    assert host.channel_multiple == host_cpu().fp32_lanes and host.multiple_from.startswith("this CPU")
    assert host.multiple_from_cpu and not get_target("rpi4").multiple_from_cpu
    level = torch.backends.cpu.get_cpu_capability()
    if level not in TORCH_LANES:
        pytest.skip(f"torch dispatches at {level}: no independent vector width to compare with")
    assert host.channel_multiple == TORCH_LANES[level]
    assert get_target("rpi4").channel_multiple == 4  # NEON: 4 fp32 lanes, fixed in its file
    assert Target(**host.to_dict()) == host  # manifests store the target as its dict


def test_cpu_multiple_on_a_board_is_refused_in_one_line(tmp_path):
    text = Path(get_target("rpi4").source).read_text().replace("channel_multiple = 4", 'channel_multiple = "cpu"')
    path = tmp_path / "rpi4.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"rpi4\.toml: key 'constraints\.channel_multiple' is \"cpu\""):
        load_target_file(path)


def test_search_multiple_follows_the_metric_unless_given():
    host = get_target("host")
    assert search_multiple(host, None, latency_budget=True).channel_multiple == host_cpu().fp32_lanes
    flops = search_multiple(host, None, latency_budget=False)
    assert flops.channel_multiple == 1 and "latency searches use" in flops.multiple_from
    assert not flops.multiple_from_cpu and not search_multiple(host, 8, latency_budget=True).multiple_from_cpu
    assert search_multiple(host, 8, latency_budget=False).channel_multiple == 8
    assert search_multiple(get_target("rpi4"), None, latency_budget=False).channel_multiple == 4
    with pytest.raises(ConfigError, match="--channel-multiple 0"):
        search_multiple(host, 0, latency_budget=True)


def test_grid_at_a_multiple_holds_every_width_the_search_can_choose():
    assert width_grid(64, 16) == [16, 32, 48, 64]
    assert width_grid(40, 16) == [16, 32, 40]  # the full width is always a choice
    assert width_grid(16, 16) == [2, 4, 8, 12, 16]  # a group no wider than the multiple: fractions
    assert width_grid(35, 8, fixed=3) == [11, 19, 27, 35]


def test_the_repository_ships_no_host_table_and_its_examples_are_refused():
    assert not list(PROFILES_DIR.glob("host-*.json"))
    host = get_target("host")
    examples = sorted((PROFILES_DIR / "examples").glob("host-*.json"))
    assert examples
    for path in examples:
        assert "cascadelake" in json.loads(path.read_text())["provenance"]["cpu"]
        with pytest.raises(ConfigError, match=rf"{path.name}: measured on Intel Xeon .*not on this CPU"):
            LatencyTable.load(path, host)
        LatencyTable.load(path)  # readable as data without a target


def test_a_table_measured_here_is_refused_on_another_cpu_and_built_once_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPACT_CACHE", str(tmp_path / "cache"))
    from edgecompact.profiling import profile

    host = dataclasses.replace(get_target("host"), channel_multiple=8)
    structure = analyze(Tiny().eval(), (1, 8, 8), "tiny")
    assert latency_model(structure, host).table.is_estimate  # no table, no build: the labelled estimate

    built: list[Path] = []

    def build(s, t, path):
        built.append(path)
        return profile(s, t, path, progress=False)

    model = latency_model(structure, host, build=build, log=lambda _: None)
    path = default_table_path(host, "tiny")
    assert built == [path] and path.parent == host_profiles_dir() and path.name == "host-fp32-tiny-m8.json"
    assert str(path).startswith(str(tmp_path / "cache")) and host_cpu().key in str(path)
    prov = model.table.provenance
    assert not model.table.is_estimate and prov["cpu_key"] == host_cpu().key and prov["channel_multiple"] == 8
    assert model(structure.baseline_widths()) > 0
    assert latency_model(structure, host, build=build).table.to_dict() == model.table.to_dict()
    assert len(built) == 1  # the second search reuses it

    other = Cpu("x86_64", "AuthenticAMD", "AMD EPYC 7B12", ("sse4_2", "avx", "fma", "avx2"), "cpuid", 2)
    monkeypatch.setattr("edgecompact.cost.latency.host_cpu", lambda: other)
    with pytest.raises(ConfigError, match=r"host-fp32-tiny-m8\.json: measured on .*not on this CPU \(AMD EPYC"):
        latency_model(structure, host, profile=path)  # a table copied from another machine
    with pytest.raises(ConfigError, match="not on this CPU"):  # nor resumed there
        profile(structure, host, path, progress=False)
    # that CPU's searches get their own folder, and their own table
    assert default_table_path(host, "tiny") != path and other.key in str(default_table_path(host, "tiny"))
