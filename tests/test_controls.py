"""The uniform and random controls land on the budget, with the widths of one multiplier."""

from __future__ import annotations

import pytest

from edgecompact.methods import run_method


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uniform", "random"])
def test_control_hits_a_flops_budget_within_2_percent(make_context, count_mflops, name: str) -> None:
    ctx = make_context("0.33x")
    result = run_method(name, ctx)
    assert abs(count_mflops(result.model, ctx) / (ctx.target_cost / 1e6) - 1) <= 0.02
    full = ctx.structure.groups
    ratios = [result.arch.widths[g] / full[g] for g in full]
    assert max(ratios) - min(ratios) <= 0.2  # one multiplier (up to rounding and the final refinement)
    kept_first = all(result.arch.keep[g] == list(range(result.arch.widths[g])) for g in full)
    assert kept_first == (name == "uniform")
