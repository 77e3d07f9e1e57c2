"""Targets: the devices edgecompact searches for and deploys to, read from `targets/*.toml`.

A Target is data (a TVM target dict or tag, a cross compiler, constraints, peak figures);
no code path depends on a target's name. Unknown or missing keys are a ConfigError naming file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgecompact.errors import ConfigError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

PRECISIONS = ("fp32", "fp16", "int8")
# What deployments ship and latency tables measure on a target: TVM's compiled module, or onnxruntime's CPU
# provider (on a desktop CPU untuned TVM is 30-100x slower than onnxruntime, so ORT is what ships there).
RUNTIMES = ("tvm", "onnxruntime")

_REQUIRED = {"name", "description", "tvm_target", "peak_gflops", "peak_gbps"}
_OPTIONAL = {"host_target", "cross_compiler", "rpc_key", "runnable_here", "runtime", "constraints"}
_CONSTRAINT_KEYS = {"channel_multiple", "precision"}


@dataclass(frozen=True)
class Target:
    """One device. `tvm_target` is a TVM tag string or a JSON-style dict (TVM 0.27 rejects "llvm -mcpu=").
    `runtime` ("tvm" | "onnxruntime") is what deployments ship and latency tables measure there."""

    name: str
    description: str
    tvm_target: str | dict[str, Any]
    peak_gflops: float
    peak_gbps: float
    host_target: str | dict[str, Any] | None = None
    cross_compiler: str | None = None
    rpc_key: str | None = None
    runnable_here: bool = False
    channel_multiple: int = 1
    precision: str = "fp32"
    runtime: str = "tvm"
    # where channel_multiple comes from: the TOML file, or this CPU's fp32 vector width (`channel_multiple = "cpu"`)
    multiple_from: str = field(default="", compare=False)
    multiple_from_cpu: bool = field(default=False, compare=False)  # channel_multiple is this CPU's vector lanes
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "tvm_target": self.tvm_target,
            "host_target": self.host_target, "cross_compiler": self.cross_compiler, "rpc_key": self.rpc_key,
            "runnable_here": self.runnable_here, "channel_multiple": self.channel_multiple,
            "multiple_from": self.multiple_from,
            "precision": self.precision, "runtime": self.runtime, "peak_gflops": self.peak_gflops,
            "peak_gbps": self.peak_gbps,
        }


def load_target_file(path: Path) -> Target:
    """Parse and validate one target TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: target file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    unknown = set(raw) - _REQUIRED - _OPTIONAL
    if unknown:
        raise ConfigError(f"{path}: unknown key '{min(unknown)}'")
    missing = _REQUIRED - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing key '{min(missing)}'")
    cons = raw.get("constraints", {})
    if not isinstance(cons, dict):
        raise ConfigError(f"{path}: key 'constraints' must be a table")
    unknown = set(cons) - _CONSTRAINT_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key 'constraints.{min(unknown)}'")
    _check_type(path, "name", raw["name"], str)
    _check_type(path, "description", raw["description"], str)
    _check_type(path, "tvm_target", raw["tvm_target"], (str, dict))
    for key in ("peak_gflops", "peak_gbps"):
        _check_type(path, key, raw[key], (int, float))
        if raw[key] <= 0:
            raise ConfigError(f"{path}: key '{key}' must be > 0")
    for key in ("cross_compiler", "rpc_key"):
        if key in raw:
            _check_type(path, key, raw[key], str)
    if "host_target" in raw:
        _check_type(path, "host_target", raw["host_target"], (str, dict))
    if "runnable_here" in raw:
        _check_type(path, "runnable_here", raw["runnable_here"], bool)
    multiple, multiple_from = cons.get("channel_multiple", 1), str(path)
    from_cpu = multiple == "cpu"
    if from_cpu:
        if not raw.get("runnable_here", False):
            raise ConfigError(f"{path}: key 'constraints.channel_multiple' is \"cpu\" (this machine's vector width) "
                              "but the target does not run here (runnable_here = false): give an integer")
        multiple, multiple_from = cpu_channel_multiple()
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ConfigError(f"{path}: key 'constraints.channel_multiple' must be an integer >= 1 or \"cpu\"")
    precision = cons.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"{path}: key 'constraints.precision' must be one of {', '.join(PRECISIONS)}")
    runtime = raw.get("runtime", "tvm")
    if runtime not in RUNTIMES:
        raise ConfigError(f"{path}: key 'runtime' must be one of {', '.join(RUNTIMES)}")
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: key 'name' is '{raw['name']}' but the file is named '{path.stem}'")
    return Target(
        name=raw["name"], description=raw["description"], tvm_target=raw["tvm_target"],
        peak_gflops=float(raw["peak_gflops"]), peak_gbps=float(raw["peak_gbps"]),
        host_target=raw.get("host_target"), cross_compiler=raw.get("cross_compiler"),
        rpc_key=raw.get("rpc_key"), runnable_here=raw.get("runnable_here", False),
        channel_multiple=multiple, precision=precision, runtime=runtime, multiple_from=multiple_from,
        multiple_from_cpu=from_cpu, source=str(path),
    )


def cpu_channel_multiple() -> tuple[int, str]:
    """The running CPU's fp32 vector lanes (8 on AVX2, 16 on AVX-512, 4 on NEON/SSE), and a line saying so: widths in
    whole vectors are what its convolution kernels run without a remainder loop."""
    from edgecompact.cpu import host_cpu

    cpu = host_cpu()
    return cpu.fp32_lanes, f"this CPU: {cpu.fp32_lanes} fp32 lanes ({cpu.vector_bits}-bit vectors)"


def _check_type(path: Path, key: str, value: Any, types: type | tuple[type, ...]) -> None:
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)
    ):
        raise ConfigError(f"{path}: key '{key}' has the wrong type ({type(value).__name__})")


def list_targets(directory: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def get_target(name_or_path: str, directory: Path = TARGETS_DIR) -> Target:
    """A target by name (`host`, `rpi4`, ...) or by the path of a TOML file."""
    if name_or_path.endswith(".toml"):
        return load_target_file(Path(name_or_path))
    path = Path(directory) / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(list_targets(directory)) or "none"
        raise ConfigError(f"unknown target '{name_or_path}' (known: {known})")
    return load_target_file(path)
