"""Controls every search method must beat (Liu et al. 2019; Blalock et al. 2020), at the same budget and epochs.

`uniform`: one width multiplier on every group, bisected to the budget, keeping each group's first channels
(no importance criterion at all), fine-tuned from the baseline's weights. `random`: the same widths, with the
kept channels drawn at random. Both fine-tune for the search methods' search epochs plus their fine-tune epochs,
so that every method and control gets the same number of training epochs after the baseline.
`uniform-scratch`: the same uniform widths, randomly initialized and trained for every epoch the protocol gives a
method (baseline + search + fine-tune): Liu et al.'s Scratch-E, the control a user tries first.
`uniform-depth-scratch`: the compound control for depth pruning and latency budgets: whole residual blocks removed
evenly in every stage (the last droppable ones of each stage), then one width multiplier fitted to the budget,
trained from scratch like `uniform-scratch`. Without `--set depth=F` it keeps F = (target / baseline cost)^(1/3)
of each stage's droppable blocks, the cube-root split of compound scaling (cost ~ depth x width^2).
A re-fit to a measured latency (`Proposal.refit`) repeats each control's own rule at the corrected target: one
multiplier, first channels (uniform), the same random order (random), the same removed blocks (uniform-depth-scratch);
their scores keep that order for callers that allocate from scores.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch

from edgecompact.budget import fit_uniform, min_widths
from edgecompact.errors import ConfigError
from edgecompact.methods.base import Proposal, SearchContext, copy_baseline, parse_options, register_method
from edgecompact.structure import Structure


def _uniform_widths(ctx: SearchContext, target: float | None = None) -> dict[str, int]:
    return fit_uniform(ctx.structure, ctx.cost, ctx.target_cost if target is None else target, ctx.budget.tolerance,
                       ctx.channel_multiple)


def _uniform_refit(ctx: SearchContext) -> Callable[[float], dict[str, list[int]]]:
    """A re-fit to a measured latency that stays a control: one multiplier again, first channels kept."""
    return lambda target: _first(_uniform_widths(ctx, target))


def _first(widths: dict[str, int]) -> dict[str, list[int]]:
    return {g: list(range(w)) for g, w in widths.items()}


def _in_order(order: torch.Tensor) -> torch.Tensor:
    """Scores that keep the channels `order` lists first, comparable across groups as one width multiplier: the
    j-th of n scores 1 - j / n."""
    n = len(order)
    scores = torch.empty(n)
    scores[order] = 1 - torch.arange(n, dtype=torch.float) / max(1, n)
    return scores


def _first_scores(structure: Structure) -> dict[str, torch.Tensor]:
    return {g: _in_order(torch.arange(full)) for g, full in structure.groups.items()}


@register_method("uniform")
def uniform(ctx: SearchContext) -> Proposal:
    widths = _uniform_widths(ctx)
    return Proposal(keep=_first(widths), source=copy_baseline(ctx), history=[{"widths": widths}],
                    extra_finetune_epochs=ctx.search_epochs, final="inherit", scores=_first_scores(ctx.structure),
                    refit=_uniform_refit(ctx))


@register_method("random")
def random(ctx: SearchContext) -> Proposal:
    widths = _uniform_widths(ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    order = {g: torch.randperm(ctx.structure.groups[g], generator=gen) for g in widths}

    def drawn(widths: dict[str, int]) -> dict[str, list[int]]:
        return {g: sorted(order[g][:w].tolist()) for g, w in widths.items()}

    return Proposal(keep=drawn(widths), source=copy_baseline(ctx), history=[{"widths": widths}],
                    extra_finetune_epochs=ctx.search_epochs, final="inherit",
                    scores={g: _in_order(o) for g, o in order.items()},
                    refit=lambda target: drawn(_uniform_widths(ctx, target)))


@register_method("uniform-scratch")
def uniform_scratch(ctx: SearchContext) -> Proposal:
    widths = _uniform_widths(ctx)
    return Proposal(keep=_first(widths), source=copy_baseline(ctx), history=[{"widths": widths}], final="scratch",
                    scores=_first_scores(ctx.structure), refit=_uniform_refit(ctx))


def dropped_blocks(structure: Structure, keep_fraction: float) -> list[str]:
    """The droppable residual blocks to remove: in each stage (blocks sharing a parent module), all but
    round(keep_fraction x the stage's droppable blocks), the last ones first."""
    stages: dict[str, list[str]] = {}
    for block in structure.blocks():
        stages.setdefault(block.rpartition(".")[0], []).append(block)
    out = []
    for blocks in stages.values():
        keep = max(0, min(len(blocks), round(keep_fraction * len(blocks))))
        out += blocks[keep:]
    return out


@register_method("uniform-depth-scratch")
def uniform_depth_scratch(ctx: SearchContext) -> Proposal:
    if not ctx.structure.droppable:
        raise ConfigError("uniform-depth-scratch: this model has no removable residual blocks here "
                          "(pass --drop-blocks, with a zoo ResNet)")
    default = (ctx.target_cost / ctx.baseline_cost) ** (1 / 3)
    depth = parse_options("uniform-depth-scratch", ctx.options, {"depth": default})["depth"]
    if not 0 <= depth <= 1:
        raise ConfigError(f"--set depth={depth:g}: expected a fraction in [0, 1]")
    chosen = depth
    if "depth" not in ctx.options:  # the cube-root split, shallower where the narrowest widths cannot reach the target
        depth = reachable_depth(ctx, depth)
    removed = dropped_blocks(ctx.structure, depth)
    zero, rest = _without(ctx.structure, removed)

    def cost(widths: dict[str, int]) -> float:
        return ctx.cost({**widths, **zero})

    def fit(target: float) -> dict[str, int]:  # the same blocks stay removed; one multiplier on the rest
        return {**fit_uniform(rest, cost, target, ctx.budget.tolerance, ctx.channel_multiple), **zero}

    widths = fit(ctx.target_cost)
    # -inf: fit_to_budget never brings a removed block back
    scores = {**_first_scores(ctx.structure), **{g: torch.full((ctx.structure.groups[g],), -math.inf) for g in zero}}
    return Proposal(keep=_first(widths), source=copy_baseline(ctx), final="scratch", scores=scores,
                    refit=lambda target: _first(fit(target)),
                    history=[{"widths": widths, "depth": round(depth, 4), "removed_blocks": removed,
                              **({"depth_lowered_from": round(chosen, 4)} if depth != chosen else {})}])


def _without(structure: Structure, removed: list[str]) -> tuple[dict[str, int], Structure]:
    """(the removed blocks' groups at width 0, the structure of what remains, with nothing more to remove)."""
    zero = {g: 0 for b in removed for g in structure.blocks()[b]}
    rest = replace(structure, groups={g: f for g, f in structure.groups.items() if g not in zero}, droppable={})
    return zero, rest


def reachable_depth(ctx: SearchContext, depth: float) -> float:
    """`depth`, or the next shallower fraction of blocks kept per stage whose narrowest widths (one channel step
    everywhere that remains) cost at most the target: a width multiplier can then land on it. On a latency table in
    steps of 16 a third of ResNet-20's ms is out of reach with two blocks of three per stage, at any width."""
    sizes = Counter(block.rpartition(".")[0] for block in ctx.structure.blocks())
    steps = sorted({k / n for n in sizes.values() for k in range(n + 1)} | {depth}, reverse=True)
    for fraction in (f for f in steps if f <= depth):
        zero, rest = _without(ctx.structure, dropped_blocks(ctx.structure, fraction))
        if ctx.cost({**min_widths(rest, ctx.channel_multiple), **zero}) <= ctx.target_cost:
            return fraction
    return 0.0
