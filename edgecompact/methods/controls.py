"""Controls every search method must beat (Liu et al. 2019; Blalock et al. 2020), fine-tuned on the same budget.

`uniform`: one width multiplier on every group, bisected to the budget, keeping each group's first channels
(no importance criterion at all). `random`: the same widths, with the kept channels drawn at random.
Both fine-tune for the search methods' search epochs plus their fine-tune epochs, so that every method and
control gets the same number of training epochs after the baseline (a method's gain must not be extra training).
"""

from __future__ import annotations

import torch

from edgecompact.budget import fit_uniform
from edgecompact.methods.base import Proposal, SearchContext, copy_baseline, register_method


def _uniform_widths(ctx: SearchContext) -> dict[str, int]:
    return fit_uniform(ctx.structure, ctx.cost, ctx.target_cost, ctx.budget.tolerance, ctx.channel_multiple)


@register_method("uniform")
def uniform(ctx: SearchContext) -> Proposal:
    widths = _uniform_widths(ctx)
    keep = {g: list(range(w)) for g, w in widths.items()}
    return Proposal(keep=keep, source=copy_baseline(ctx), history=[{"widths": widths}],
                    extra_finetune_epochs=ctx.search_epochs)


@register_method("random")
def random(ctx: SearchContext) -> Proposal:
    widths = _uniform_widths(ctx)
    gen = torch.Generator().manual_seed(ctx.seed)
    keep = {g: sorted(torch.randperm(ctx.structure.groups[g], generator=gen)[:w].tolist()) for g, w in widths.items()}
    return Proposal(keep=keep, source=copy_baseline(ctx), history=[{"widths": widths}],
                    extra_finetune_epochs=ctx.search_epochs)
