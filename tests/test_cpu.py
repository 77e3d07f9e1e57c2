"""The running CPU's facts and the CPU assumptions they replace: ISA read at run time, int8 settings chosen by
ISA, machine fields naming the CPU, TVM's mcpu resolved to whatever LLVM calls this CPU (Intel or AMD)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from edgecompact.cpu import Cpu, _proc_cpuinfo, host_cpu, int8_scheme
from edgecompact.deploy.artifact import int8_scheme_for
from edgecompact.targets import get_target


def _cpu(arch: str, *flags: str, model: str = "") -> Cpu:
    return Cpu(arch, "", model, flags, "test", 2)


def test_host_cpu_agrees_with_the_kernel_and_torch():
    """Read from CPUID on x86 (what onnxruntime, LLVM and torch dispatch on): the same extensions Linux lists,
    and at least the vector level torch dispatches to."""
    import torch

    cpu = host_cpu()
    assert cpu.arch == platform.machine() and cpu.cores == os.cpu_count()
    proc = _proc_cpuinfo()
    # qemu-user (this process's real name then) passes the host's /proc/cpuinfo through: there CPUID, which
    # everything dispatches on, is the emulated CPU's and the kernel describes another one
    emulated = bool(proc) and Path("/proc/self/status").read_text().startswith("Name:\tqemu")
    if proc and cpu.source == "cpuid" and not emulated:
        listed = set(proc.get("flags", "").split())
        core = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni")
        assert {f for f in core if f in cpu.flags} == {f for f in core if f in listed}
        assert cpu.model == " ".join(proc["model name"].split())
    level = torch.backends.cpu.get_cpu_capability()  # may be lowered by ATEN_CPU_CAPABILITY, never raised
    if level == "AVX512":
        assert cpu.fp32_lanes == 16
    elif level == "AVX2":
        assert cpu.fp32_lanes >= 8


@pytest.mark.parametrize("cpu, lanes, reduce_range", [
    (_cpu("x86_64", "avx", "fma", "avx2", model="AMD EPYC 7B13 (Zen 3)"), 8, True),
    (_cpu("x86_64", "avx", "fma", "avx2", "avx_vnni", model="Intel Core i7-12700 (Alder Lake)"), 8, False),
    (_cpu("x86_64", "avx2", "avx512f", "avx512bw", model="Intel Xeon Gold 6148 (Skylake-SP)"), 16, True),
    (_cpu("x86_64", "avx2", "avx512f", "avx512_vnni", model="Intel Xeon (Cascade Lake)"), 16, False),
    (_cpu("x86_64", "avx2", "avx512f", "avx512_vnni", model="AMD EPYC 9654 (Zen 4)"), 16, False),
    (_cpu("aarch64", "asimd", model="Cortex-A72"), 4, False),
    (_cpu("aarch64", "asimd", "asimddp", model="Cortex-A76"), 4, False),
])
def test_int8_settings_follow_the_isa(cpu, lanes, reduce_range):
    assert cpu.fp32_lanes == lanes
    scheme = int8_scheme(cpu)
    assert scheme.reduce_range == reduce_range
    assert scheme.weight_qmax == (64 if reduce_range else 127)
    assert scheme.to_dict()["reduce_range"] == reduce_range and cpu.model in scheme.reason


def test_int8_settings_of_a_target_are_this_cpus_only_where_it_runs_here():
    assert int8_scheme_for(get_target("host")) == int8_scheme()
    assert int8_scheme_for(get_target("rpi4")).reduce_range is False


def test_machine_fields_name_the_cpu_and_its_isa():
    from edgecompact.report import bench_document

    doc = bench_document("t", "cmd", "protocol", [])
    cpu = host_cpu()
    assert cpu.describe() in doc["machine"] and f"{cpu.fp32_lanes} fp32 lanes" in doc["machine"]
    assert f"{os.cpu_count()} cores" in doc["machine"]


@pytest.mark.parametrize("llvm_cpu", ["znver2", "znver3", "znver4", "haswell", "cascadelake"])
def test_host_mcpu_is_whatever_llvm_calls_this_cpu(monkeypatch, llvm_cpu):
    """mcpu "native" becomes LLVM's name for the running CPU (AMD's znver* as much as Intel's), and the tuning
    database is keyed by that name and by the CPU's model and ISA (`Cpu.key`), so records tuned on one CPU are never
    applied on another."""
    from tvm.target import codegen

    from edgecompact.deploy import tvm as etvm

    monkeypatch.setattr(codegen, "llvm_get_system_cpu", lambda: llvm_cpu)
    tgt = etvm.tvm_target(get_target("host"))
    assert str(tgt.attrs["mcpu"]) == llvm_cpu and str(tgt.host.attrs["mcpu"]) == llvm_cpu
    assert etvm.default_db_dir(get_target("host")).name == f"host-{llvm_cpu}-{host_cpu().key}"
