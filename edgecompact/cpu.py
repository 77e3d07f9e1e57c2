"""The running CPU's facts (vendor, model, ISA extensions, fp32 vector width), read at run time, and the int8
quantization settings they decide.

On x86-64 the ISA comes from the CPUID instruction, what onnxruntime's MLAS, LLVM and torch dispatch on (under
qemu-user /proc/cpuinfo shows the host's flags, CPUID the emulated CPU's); elsewhere from /proc/cpuinfo, else from
torch's dispatch level. This module only reads; nothing here changes how anything runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache

# The extensions that decide a kernel choice here, in Linux's /proc/cpuinfo spelling.
X86_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve")


@dataclass(frozen=True)
class Cpu:
    arch: str  # platform.machine(): x86_64, aarch64, ...
    vendor: str  # GenuineIntel, AuthenticAMD, ARM implementer 0x41, ... ("" when unknown)
    model: str  # the brand string ("" when unknown)
    flags: tuple[str, ...]  # which of X86_FLAGS / ARM_FLAGS this CPU has and the OS enables
    source: str  # where the flags came from: "cpuid", "/proc/cpuinfo" or "torch"
    cores: int

    @property
    def x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def vnni(self) -> bool:
        """An int8 dot product that accumulates in int32 (VNNI on x86, SDOT on Arm): no int16 intermediate."""
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni", "asimddp"))

    @property
    def vector_bits(self) -> int:
        if "avx512f" in self.flags:
            return 512
        if "avx2" in self.flags or "avx" in self.flags:
            return 256
        return 128  # SSE, NEON; SVE is length-agnostic and at least 128

    @property
    def fp32_lanes(self) -> int:
        return self.vector_bits // 32

    @property
    def key(self) -> str:
        """A file-name-safe name of this CPU for per-machine data (latency tables): brand string and a digest of the
        ISA flags, so two CPUs under one generic brand ("Intel(R) Xeon(R) Processor") but different ISAs differ."""
        name = re.sub(r"[^a-z0-9]+", "-", (self.model or self.vendor or "unknown").lower()).strip("-")[:48]
        digest = hashlib.sha1("+".join((self.arch, *self.flags)).encode()).hexdigest()[:8]
        return f"{self.arch}-{name}-{digest}"

    def describe(self) -> str:
        """One line for `machine` fields: 'Intel(R) Xeon(R) ... (avx2+fma+avx512f+avx512_vnni, 16 fp32 lanes)'."""
        isa = "+".join(self.flags) or "no vector extensions found"
        return f"{self.model or self.vendor or self.arch} ({isa}, {self.fp32_lanes} fp32 lanes)"

    def to_dict(self) -> dict:
        return {"key": self.key, "arch": self.arch, "vendor": self.vendor, "model": self.model, "flags": list(self.flags),
                "vnni": self.vnni, "vector_bits": self.vector_bits, "fp32_lanes": self.fp32_lanes,
                "cores": self.cores, "source": self.source}


@lru_cache(maxsize=1)
def host_cpu() -> Cpu:
    """The CPU this process runs on."""
    arch, cores = platform.machine() or "unknown", os.cpu_count() or 1
    proc = _proc_cpuinfo()
    if arch.lower() in ("x86_64", "amd64") and os.name == "posix":
        try:
            vendor, model, flags = _x86_cpuid()
            return Cpu(arch, vendor, model, flags, "cpuid", cores)
        except (OSError, ValueError):  # executable memory refused (hardened kernel): fall back to the OS's view
            pass
    if proc:
        known = X86_FLAGS if arch.lower() in ("x86_64", "amd64") else ARM_FLAGS
        have = set(proc.get("flags", proc.get("Features", "")).split())
        vendor = proc.get("vendor_id") or (f"ARM implementer {proc['CPU implementer']}"
                                          if "CPU implementer" in proc else "")
        return Cpu(arch, vendor, proc.get("model name", ""), tuple(f for f in known if f in have),
                   "/proc/cpuinfo", cores)
    import torch

    level = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = {"AVX512": ("avx", "fma", "avx2", "avx512f"), "AVX2": ("avx", "fma", "avx2")}.get(level, ())
    return Cpu(arch, "", platform.processor(), flags, "torch", cores)


def _proc_cpuinfo() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    try:
        text = open("/proc/cpuinfo").read()  # noqa: SIM115 - one short read
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


# x86-64 System V: cpuid(leaf=edi, subleaf=esi, out=rdx -> eax, ebx, ecx, edx); xgetbv(0) -> rax.
_CPUID = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3".replace(" ", ""))
_XGETBV = bytes.fromhex("31c9 0f01d0 48c1e220 4809d0 c3".replace(" ", ""))


def _x86_cpuid() -> tuple[str, str, tuple[str, ...]]:
    """(vendor, brand string, flags) from CPUID, the AVX and AVX-512 flags only where the OS saves their state."""
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        code.write(_CPUID)
        code.seek(64)
        code.write(_XGETBV)
        base = ctypes.addressof(ctypes.c_char.from_buffer(code))
        regs_t = ctypes.c_uint32 * 4
        call = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(regs_t))(base)

        def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
            regs = regs_t()
            call(leaf, sub, ctypes.byref(regs))
            return tuple(regs)

        top, ebx, ecx, edx = cpuid(0)
        vendor = b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode(errors="replace")
        _, _, c1, _ = cpuid(1)
        _, b7, c7, d7 = cpuid(7) if top >= 7 else (0, 0, 0, 0)
        a71 = cpuid(7, 1)[0] if top >= 7 else 0
        xcr0 = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + 64)() if c1 >> 27 & 1 else 0  # OSXSAVE
        brand = b""
        if cpuid(0x80000000)[0] >= 0x80000004:
            brand = b"".join(r.to_bytes(4, "little") for leaf in range(0x80000002, 0x80000005) for r in cpuid(leaf))
    finally:
        code.close()
    avx_os, avx512_os = xcr0 & 0x6 == 0x6, xcr0 & 0xE6 == 0xE6
    bits = {
        "sse4_2": c1 >> 20 & 1, "avx": avx_os and c1 >> 28 & 1, "fma": avx_os and c1 >> 12 & 1,
        "avx2": avx_os and b7 >> 5 & 1, "avx512f": avx512_os and b7 >> 16 & 1,
        "avx512bw": avx512_os and b7 >> 30 & 1, "avx512vl": avx512_os and b7 >> 31 & 1,
        "avx512_vnni": avx512_os and c7 >> 11 & 1, "avx_vnni": avx_os and a71 >> 4 & 1, "amx_int8": d7 >> 25 & 1,
    }
    model = " ".join(brand.rstrip(b"\0").decode(errors="replace").split())
    return vendor, model, tuple(f for f in X86_FLAGS if bits[f])


@dataclass(frozen=True)
class Int8Scheme:
    """The settings of onnxruntime's static QDQ quantization (`quantize_static`) that depend on the CPU, shared by
    the deploy stage and the fake-quantization proxy so that the two stay the same model.

    reduce_range: weights in [-64, 64] instead of [-127, 127]. x86 without VNNI multiplies uint8 activations by
    int8 weights with vpmaddubsw, which adds pairs of products in int16 and saturates (255 x 127 x 2 > 32767);
    7-bit weights cannot overflow. Activations are uint8 [0, 255] either way (ORT's QDQ quantizer ignores
    reduce_range for activations).
    """

    reduce_range: bool = False
    reason: str = ""

    @property
    def weight_qmax(self) -> int:
        return 64 if self.reduce_range else 127

    def to_dict(self) -> dict:
        return {"format": "QDQ", "reduce_range": self.reduce_range,
                "weights": f"int8 [-{self.weight_qmax}, {self.weight_qmax}], per output channel, symmetric",
                "activations": "uint8 [0, 255], per tensor, MinMax", "reason": self.reason}


def int8_scheme(cpu: Cpu | None = None) -> Int8Scheme:
    """The int8 settings for onnxruntime on `cpu` (default: this one)."""
    cpu = cpu or host_cpu()
    name = cpu.model or cpu.arch
    if cpu.x86 and not cpu.vnni:
        return Int8Scheme(True, f"{name}: x86 without VNNI, onnxruntime's u8s8 kernels sum int16 pairs and "
                                "saturate; 7-bit weights cannot")
    return Int8Scheme(False, f"{name}: " + ("VNNI/SDOT accumulates in int32" if cpu.vnni else
                                            "no int16 pair sums in onnxruntime's int8 kernels here"))
