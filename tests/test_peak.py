"""The FMA peak kernel computes what its FLOP count says: every chain runs a * b + c `iters` times."""

from __future__ import annotations

import math

import numpy as np

from edgecompact.deploy import peak


def test_peak_kernel_runs_every_chain_for_every_iteration():
    iters = 1000
    total, firsts = peak.run_chains(iters)
    lanes = peak._kernel()[1]
    # the same recurrence with one float32 rounding per step, as a fused multiply-add rounds (the float64 product
    # of two float32 values is exact)
    a = np.array([(j + 1) / peak.CHAINS for j in range(peak.CHAINS)], dtype=np.float32)
    b, c = np.float64(np.float32(0.999999)), np.float64(np.float32(1e-6))
    for _ in range(iters):
        a = (a.astype(np.float64) * b + c).astype(np.float32)
    assert np.allclose(firsts, a, rtol=1e-6)
    assert math.isclose(total, lanes * float(a.astype(np.float64).sum()), rel_tol=1e-6)
    assert peak.flops_per_iteration(lanes) == 2 * peak.CHAINS * lanes


def test_peak_is_measured_on_this_cpu_and_labelled():
    p = peak.fp32_peak_gflops(seconds=0.01, repeat=2)
    assert p["gflops_per_core"] > 0 and p["lanes"] == peak._kernel()[1]
    assert p["cpu"] in str(peak._kernel()[0]._name)  # one kernel per CPU, in the per-CPU cache
