"""Group Lasso / structured sparsity learning (Wen et al. 2016), on our coupled channel groups.

One lasso group is one channel of a coupled group: every slice that channel owns (weight rows of the convs, linears
and BNs that write it, input columns of the layers that read it). Penalty `lambda * sum_gc a_g * ||W_gc||_2`,
a_g = c_g * sqrt(n_g) * s_g: c_g the group's marginal cost in the budget's metric (FLOPs, params or ms; mean 1 over
channels; option cost_weighted), n_g the slice size (Yuan & Lin) and s_g the group's mean channel RMS in the baseline
(so layers with different weight scales shrink at the same relative rate). The classifier's outputs are never
penalized. Must not slim or fit budgets itself: it returns scores to `fit_scores` and the sparse-trained source.

Schedule (options, defaults chosen on Fashion-MNIST/digits): SGD at the fine-tune lr for `search_epochs`, zeroing
|w| < 1e-4 after each step (Wen's README). lambda, unless given, is set from the schedule: with strength 1 the
penalty alone would zero a typical channel of the costliest group by the end; default strength 0.3 (1 wrecks a
short-trained net, whose small data loss cannot defend channels). Scores: each channel's norm over its group's mean
norm (option score=mean); score=baseline divides by the group's mean norm before training instead, which also
shows whole groups shrinking, but in short schedules it cut the costliest (early) groups to one channel.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from edgecompact.budget import fit_scores
from edgecompact.errors import ConfigError
from edgecompact.methods.base import (
    Proposal,
    SearchContext,
    copy_baseline,
    marginal_costs,
    parse_options,
    register_method,
)
from edgecompact.structure import LayerValues, Structure, channel_sums
from edgecompact.train import lr_sum, train

# `--set` options and their defaults (lr: the fine-tune's; lambda None: chosen from `strength`, see auto_lambda)
OPTIONS: dict[str, object] = {"lr": 0.01, "cost_weighted": True, "score": "mean", "lambda": None, "strength": 0.3,
                              "zero_below": 1e-4}



def _values(model: nn.Module, structure: Structure, fn) -> LayerValues:
    mods = dict(model.named_modules())
    vals = {}
    for layer in structure.layers:
        m = mods[layer.name]
        bias = getattr(m, "bias", None)
        vals[layer.name] = (fn(m.weight), None if bias is None else fn(bias))
    return vals


def slice_sizes(model: nn.Module, structure: Structure) -> dict[str, int]:
    """Number of parameters one channel of each group owns across all its slices."""
    counts = channel_sums(structure, _values(model, structure, torch.ones_like))
    return {g: int(c[0]) for g, c in counts.items()}


def slice_norms(model: nn.Module, structure: Structure) -> dict[str, torch.Tensor]:
    """Per-channel L2 norm of all coupled slices (differentiable; zero-guarded so the gradient at 0 is 0)."""
    sq = channel_sums(structure, _values(model, structure, lambda t: t.pow(2)))
    return {g: s.clamp_min(1e-20).sqrt() for g, s in sq.items()}


def group_lasso_penalty(model: nn.Module, structure: Structure, weights: dict[str, float]) -> torch.Tensor:
    """sum_g weights[g] * sum_c ||W_gc||_2 (weights[g] already holds sqrt(n_g) and any cost weighting)."""
    norms = slice_norms(model, structure)
    return sum(weights[g] * n.sum() for g, n in norms.items())


def cost_weights(ctx: SearchContext) -> dict[str, float]:
    """Each group's marginal cost per channel (the budget's metric), normalized to mean 1 over all channels."""
    widths = ctx.structure.baseline_widths()
    marg = marginal_costs(ctx.cost, ctx.structure, widths)
    floor = 1e-6 * max(marg.values())  # a channel that saves nothing is still penalized a little
    marg = {g: max(v, floor) for g, v in marg.items()}
    mean = sum(marg[g] * w for g, w in widths.items()) / sum(widths.values())
    return {g: v / mean for g, v in marg.items()}


def _zero_small(threshold: float):
    @torch.no_grad()
    def after_step(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.masked_fill_(m.weight.abs() < threshold, 0.0)

    return after_step


def auto_lambda(ctx: SearchContext, cost_w: dict[str, float], lr: float, strength: float) -> float:
    """lambda with which the penalty alone would zero a typical channel of the costliest group in the schedule.

    With weights c_g * sqrt(n_g) * s_g, a channel of RMS s_g shrinks by the fraction lr_eff * lambda * c_g per
    step, so it reaches 0 when lambda * c_g * sum(lr_eff) = 1; lr_eff sums the cosine schedule and SGD's momentum.
    """
    cfg = ctx.search_config(lr=lr)
    pull = lr_sum(cfg, len(ctx.data.train)) / (1 - cfg.momentum)
    return strength / (pull * max(cost_w.values()))


def penalty_weights(model: nn.Module, structure: Structure, cost_w: dict[str, float]) -> dict[str, float]:
    """c_g * sqrt(n_g) * s_g: cost weight, Yuan & Lin's size factor, and the group's mean channel RMS in `model`.

    The RMS factor makes the penalty shrink every layer at the same relative rate whatever its weight scale
    (initializations scale weights by fan-in), so only the cost weight decides where the pressure goes.
    """
    sizes = slice_sizes(model, structure)
    with torch.no_grad():
        rms = {g: float(n.mean()) / math.sqrt(sizes[g]) for g, n in slice_norms(model, structure).items()}
    return {g: cost_w[g] * math.sqrt(sizes[g]) * rms[g] for g in structure.groups}


@register_method("group-lasso")
def group_lasso(ctx: SearchContext) -> Proposal:
    """Sparse-train a copy of the baseline with the (cost-weighted) group lasso, then cut to the budget."""
    opts = parse_options("group-lasso", ctx.options, {**OPTIONS, "lr": ctx.finetune.lr})
    lr, weighted, score_by = opts["lr"], opts["cost_weighted"], opts["score"]
    if score_by not in ("baseline", "mean"):
        raise ConfigError(f"--set score={score_by}: choose baseline or mean")
    model = copy_baseline(ctx)
    structure = ctx.structure
    cost_w = cost_weights(ctx) if weighted else {g: 1.0 for g in structure.groups}
    weights = penalty_weights(model, structure, cost_w)
    sizes = slice_sizes(model, structure)
    with torch.no_grad():
        before = {g: n.mean() for g, n in slice_norms(model, structure).items()}
    lam = opts["lambda"] if opts["lambda"] is not None else auto_lambda(ctx, cost_w, lr, opts["strength"])
    ctx.log(f"group-lasso: lambda={lam:.3g} lr={lr:g} cost_weighted={weighted} epochs={ctx.search_epochs}")
    hist = sparse_train(ctx, model, weights, lam, lr, opts["zero_below"],
                        ctx.state_path("group_lasso.pt"))
    with torch.no_grad():
        norms = slice_norms(model, structure)
    # baseline: a channel's norm over its group's mean norm before sparse training (shows whole groups shrinking);
    # mean: over its group's mean norm now (relative within the group only)
    scores = {g: n / (before[g] if score_by == "baseline" else n.mean()) for g, n in norms.items()}
    keep = fit_scores(structure, scores, ctx.cost, ctx.target_cost, ctx.budget.tolerance, ctx.channel_multiple,
                      allocation=ctx.budget.rule)
    zeros = sum(int((n / math.sqrt(sizes[g]) < 1e-3).sum()) for g, n in norms.items())
    history = [{"lambda": lam, "lr": lr, "cost_weighted": weighted, "score": score_by, "epochs": ctx.search_epochs,
                "cost_weights": {g: round(v, 4) for g, v in cost_w.items()},
                "train": hist["epochs"], "channels_below_1e-3_rms": zeros,
                "group_norm_ratio": {g: round(float(n.mean() / before[g]), 4) for g, n in norms.items()},
                "widths": {g: len(v) for g, v in keep.items()}}]
    return Proposal(keep=keep, source=model, history=history, scores=scores)


def sparse_train(ctx: SearchContext, model: nn.Module, weights: dict[str, float], lam: float, lr: float,
                 zero_below: float = 1e-4, checkpoint: Path | None = None) -> dict:
    """Train `model` in place on CE + lam * group_lasso_penalty (lam = 0: the same run without the penalty)."""

    def regularizer(m: nn.Module) -> torch.Tensor:
        return lam * group_lasso_penalty(m, ctx.structure, weights)

    return train(model, ctx.data.train, ctx.search_config(lr=lr), val_set=ctx.data.val,
                 checkpoint=checkpoint, regularizer=regularizer if lam > 0 else None,
                 after_step=_zero_small(zero_below) if zero_below > 0 else None, desc="group-lasso")
