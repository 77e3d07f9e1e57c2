"""The host CPU's measured fp32 FMA peak per core, the yardstick for each operator's share of the machine.

A C kernel of independent fused multiply-add chains at the CPU's vector width, compiled once per CPU with the
system C compiler (the one TVM's export uses) and called through ctypes on one thread. It measures only: no
timing here decides anything, benchmarks record it beside their timings (../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
from functools import lru_cache

from edgecompact.cpu import host_cpu
from edgecompact.errors import DeployError
from edgecompact.storage import cache_root

CHAINS = 12  # independent accumulators: more than FMA latency (4 cycles) x ports (2) so the units never wait
# One iteration is CHAINS fused multiply-adds on LANES floats: 2 x CHAINS x LANES flops. The accumulators stay in
# registers (12 of 16 ymm on AVX2, of 32 zmm on AVX-512); -ffp-contract=fast fuses a * b + c into one FMA.
_SOURCE = r"""
typedef float vec __attribute__((vector_size(LANES * 4)));
double fma_chains(long iters, float *out) {
    vec a[CHAINS], b, c;
    for (int k = 0; k < LANES; k++) { b[k] = 0.999999f; c[k] = 1e-6f; }
    for (int j = 0; j < CHAINS; j++) for (int k = 0; k < LANES; k++) a[j][k] = (float)(j + 1) / CHAINS;
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
        for (int j = 0; j < CHAINS; j++) a[j] = a[j] * b + c;
    }
    double s = 0;
    for (int j = 0; j < CHAINS; j++) for (int k = 0; k < LANES; k++) { s += a[j][k]; out[j] = a[j][0]; }
    return s;
}
"""


def flops_per_iteration(lanes: int) -> int:
    return 2 * CHAINS * lanes


@lru_cache(maxsize=1)
def _kernel() -> tuple[ctypes.CDLL, int]:
    cpu = host_cpu()
    lanes = cpu.fp32_lanes
    lib = cache_root() / "peak" / cpu.key / "fma_chains.so"
    if not lib.is_file():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise DeployError("no C compiler (cc) to build the FMA peak kernel: apt-get install gcc")
        lib.parent.mkdir(parents=True, exist_ok=True)
        src = lib.with_suffix(".c")
        src.write_text(_SOURCE)
        tmp = lib.with_name(lib.name + ".tmp")
        flags = ["-O2", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", f"-DLANES={lanes}",
                 f"-DCHAINS={CHAINS}"]
        proc = subprocess.run([cc, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise DeployError(f"building the FMA peak kernel failed: {proc.stderr.strip()[-300:]}")
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    dll.fma_chains.restype = ctypes.c_double
    dll.fma_chains.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_float)]
    return dll, lanes


def run_chains(iters: int) -> tuple[float, list[float]]:
    """Run the kernel for `iters` iterations: (sum of every lane, the first lane of each chain)."""
    dll, _ = _kernel()
    out = (ctypes.c_float * CHAINS)()
    total = dll.fma_chains(iters, out)
    return total, list(out)


@lru_cache(maxsize=1)
def fp32_peak_gflops(seconds: float = 0.1, repeat: int = 7) -> dict:
    """Measured fp32 FMA GFLOP/s of one core: the best of `repeat` runs of about `seconds` each (a peak is the
    fastest the core goes; slower runs are other work on the core)."""
    _, lanes = _kernel()
    iters = 1 << 16
    while True:  # calibrate the iteration count to about `seconds`
        t = time.perf_counter()
        run_chains(iters)
        dt = time.perf_counter() - t
        if dt >= seconds / 4:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        run_chains(iters)
        best = max(best, iters * flops_per_iteration(lanes) / (time.perf_counter() - t) / 1e9)
    return {"gflops_per_core": round(best, 2), "lanes": lanes, "kernel": f"{CHAINS} FMA chains x {lanes} fp32 lanes, "
            f"1 thread, best of {repeat} x {seconds:g} s", "cpu": host_cpu().key}
