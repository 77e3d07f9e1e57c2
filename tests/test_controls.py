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
