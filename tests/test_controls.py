"""The uniform and random controls land on the budget, with the widths of one multiplier."""

from __future__ import annotations

from dataclasses import replace

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


def _scratch_config(epochs: int = 2):
    from edgecompact.train import TrainConfig

    return TrainConfig(epochs=epochs, lr=0.05, batch_size=64, progress=False)


@pytest.mark.slow
def test_uniform_scratch_trains_the_uniform_widths_from_random_weights(make_context, count_mflops, tmp_path):
    import torch

    ctx = make_context("1/3x", scratch=_scratch_config(), run_dir=tmp_path)
    inherited = run_method("uniform", ctx)
    result = run_method("uniform-scratch", ctx)
    assert result.arch.widths == inherited.arch.widths
    assert result.metrics["final"] == "scratch" and set(result.metrics["final_val_top1"]) == {"scratch"}
    assert abs(count_mflops(result.model, ctx) / (ctx.target_cost / 1e6) - 1) <= 0.02
    # trained for the from-scratch schedule (its checkpoint holds every epoch), not fine-tuned from the baseline
    saved = torch.load(tmp_path / "scratch.pt", weights_only=True)
    assert len(saved["history"]["epochs"]) == 2 and saved["history"]["config"]["lr"] == 0.05


def test_from_scratch_needs_a_schedule(make_context):
    from edgecompact.errors import ConfigError

    with pytest.raises(ConfigError, match="from-scratch schedule"):
        run_method("uniform-scratch", make_context("1/3x"))


@pytest.mark.slow
def test_depth_control_removes_blocks_evenly_per_stage_then_fits_widths(make_context, count_mflops):
    ctx = make_context("1/3x", scratch=_scratch_config(1), drop_blocks=True)
    result = run_method("uniform-depth-scratch", ctx)
    removed = result.history[0]["removed_blocks"]
    assert result.history[0]["depth"] == pytest.approx((1 / 3) ** (1 / 3), abs=1e-3)
    # ResNet-20: three droppable blocks per stage; keep round(0.69 x 3) = 2, the last one of each stage goes
    assert removed == ["layer1.2", "layer2.2", "layer3.2"]
    assert ctx.structure.dropped_blocks(result.arch.widths) == removed
    assert abs(count_mflops(result.model, ctx) / (ctx.target_cost / 1e6) - 1) <= 0.02
    kept = {g: w / ctx.structure.groups[g] for g, w in result.arch.widths.items() if w}
    assert max(kept.values()) - min(kept.values()) <= 0.25  # one multiplier on what remains


def test_depth_control_refuses_a_model_without_removable_blocks(make_context):
    from edgecompact.errors import ConfigError

    with pytest.raises(ConfigError, match="--drop-blocks"):
        run_method("uniform-depth-scratch", make_context("1/3x", scratch=_scratch_config(1)))


def test_depth_control_goes_shallower_where_its_narrowest_widths_cannot_reach_the_budget(make_context, count_mflops):
    """In steps of 16, ResNet-20 with two blocks of three per stage costs 31% of the FLOPs at its narrowest, so a
    quarter is out of reach at the cube-root depth (0.63 -> two blocks kept): one block per stage is kept instead,
    and the widths land on the budget (torch's FlopCounterMode as the truth)."""
    from edgecompact.methods.base import get_method
    from edgecompact.structure import slim

    ctx = make_context("0.25x", drop_blocks=True, channel_multiple=16)
    p = get_method("uniform-depth-scratch")(ctx)
    h = p.history[0]
    assert h["depth_lowered_from"] == pytest.approx(0.25 ** (1 / 3), abs=1e-3)
    assert h["depth"] == pytest.approx(1 / 3, abs=1e-3)
    assert h["removed_blocks"] == ["layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    model = slim(ctx.baseline, ctx.structure, p.keep)
    assert abs(count_mflops(model, ctx) / (ctx.target_cost / 1e6) - 1) <= ctx.budget.tolerance
    # a depth given with --set is kept as given
    given = get_method("uniform-depth-scratch")(replace(ctx, options={"depth": "0.63"})).history[0]
    assert given["removed_blocks"] == ["layer1.2", "layer2.2", "layer3.2"] and "depth_lowered_from" not in given
