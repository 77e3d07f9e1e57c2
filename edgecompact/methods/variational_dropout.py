"""Sparse Variational Dropout (Molchanov, Ashukha, Vetrov 2017), extended to filters (channels of our groups).

Every conv and linear layer of a copy of the baseline becomes a VD layer: q(w) = N(theta, sigma^2), theta starting
from the pretrained weight, a learned per-weight log sigma^2, log alpha = log sigma^2 - log theta^2 clipped to
[-8, 8], the local reparameterization trick in training and theta masked where log alpha > 3 in eval. Loss:
CE_mean + beta * KL / N, with Molchanov's approximation of the KL to the log-uniform prior. Must not slim or fit
budgets itself: it returns channel scores to `fit_scores` and the VD-trained weights as the source.

Initialization and warm-up (they matter, the paper says): log sigma^2 = log_alpha + log(mean theta^2 of the
layer), log_alpha = -4 (what the paper's -10 for a pretrained net gives a layer of weight RMS 0.05, but the same
for every layer whatever its weight scale; small weights still start closer to being dropped). beta rises linearly
from 0 to 1 over the first `warmup` (default 0.3) of the search steps, then stays at 1 (the paper: 0 for 5 epochs,
1 by epoch 20 of 200). Adam, no weight decay, lr 1e-3; log sigma^2 moves `sigma_lr_mult` (default 30) times faster:
it is stored divided by that factor, which for Adam is exactly a per-parameter learning-rate multiplier (without
it log alpha cannot travel its range in a few epochs).

Channels: a channel's dropped share is the fraction of its weights (writer rows and reader columns of every
coupled conv/linear) with log alpha > 3; score = 1 - share, ties broken by mean log alpha, and `fit_scores`
bisects the threshold that lands on the budget. By default (score=mean) each group's scores are divided by their
mean: VD drops far larger shares in the late, wide layers, and a global share threshold (score=share) cut whole
stages to one channel on Fashion-MNIST. The source is theta, masked, loaded into a plain copy of the baseline.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecompact.budget import fit_scores
from edgecompact.errors import ConfigError
from edgecompact.methods.base import Proposal, SearchContext, copy_baseline, parse_options, register_method
from edgecompact.structure import Structure, channel_sums
from edgecompact.train import load_checkpoint, train

# `--set` options and their defaults
OPTIONS: dict[str, object] = {"lr": 1e-3, "warmup": 0.3, "log_alpha": -4.0, "sigma_lr_mult": 30.0, "threshold": 3.0,
                              "score": "mean"}

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0


def kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s approximation of KL(q(w) || log-uniform prior) per weight (-> 0 as log alpha -> inf)."""
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


class _VDMixin:
    weight: nn.Parameter
    log_sigma2_raw: nn.Parameter
    sigma_scale: float
    threshold: float

    def _init_vd(self, layer: nn.Module, log_alpha: float, sigma_scale: float, threshold: float) -> None:
        self.weight = nn.Parameter(layer.weight.detach().clone())
        log_sigma2 = log_alpha + float(torch.log(self.weight.detach().pow(2).mean() + 1e-12))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.sigma_scale = sigma_scale
        self.threshold = threshold
        self.log_sigma2_raw = nn.Parameter(torch.full_like(self.weight, log_sigma2 / sigma_scale))

    def log_alpha(self) -> torch.Tensor:
        log_sigma2 = self.log_sigma2_raw * self.sigma_scale
        return (log_sigma2 - torch.log(self.weight.pow(2) + 1e-8)).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * (self.log_alpha() <= self.threshold).to(self.weight.dtype)

    def _forward(self, x: torch.Tensor, op) -> torch.Tensor:
        if not self.training:
            return op(x, self.masked_weight(), self.bias)
        mu = op(x, self.weight, self.bias)
        var = op(x * x, self.log_alpha().exp() * self.weight.pow(2), None)
        return mu + (var + 1e-8).sqrt() * torch.randn_like(mu)


class VDConv2d(_VDMixin, nn.Module):
    """A Conv2d with sparse VD noise (local reparameterization); theta is `weight`."""

    def __init__(self, conv: nn.Conv2d, log_alpha: float = -4.0, sigma_scale: float = 1.0,
                 threshold: float = 3.0) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(f"variational-dropout: padding_mode '{conv.padding_mode}' is not supported")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._init_vd(conv, log_alpha, sigma_scale, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, lambda t, w, b: F.conv2d(t, w, b, self.stride, self.padding, self.dilation,
                                                         self.groups))


class VDLinear(_VDMixin, nn.Module):
    """A Linear layer with sparse VD noise (local reparameterization); theta is `weight`."""

    def __init__(self, linear: nn.Linear, log_alpha: float = -4.0, sigma_scale: float = 1.0,
                 threshold: float = 3.0) -> None:
        super().__init__()
        self._init_vd(linear, log_alpha, sigma_scale, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, F.linear)


VD_TYPES = (VDConv2d, VDLinear)


def to_variational(model: nn.Module, log_alpha: float = -4.0, sigma_scale: float = 1.0,
                   threshold: float = 3.0) -> nn.Module:
    """A copy of `model` whose Conv2d and Linear layers are VD layers (same names, theta = the weights).

    Each layer's log sigma^2 starts at `log_alpha` + log(mean theta^2 of the layer).
    """
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parent, _, child = name.rpartition(".")
            vd = VDConv2d if isinstance(m, nn.Conv2d) else VDLinear
            setattr(model.get_submodule(parent), child, vd(m, log_alpha, sigma_scale, threshold))
    return model


def to_plain(vd_model: nn.Module, template: nn.Module) -> nn.Module:
    """A copy of the plain `template` carrying `vd_model`'s weights (theta masked where log alpha > threshold)."""
    state = {k: v for k, v in vd_model.state_dict().items() if not k.endswith("log_sigma2_raw")}
    for name, m in vd_model.named_modules():
        if isinstance(m, VD_TYPES):
            state[f"{name}.weight"] = m.masked_weight().detach()
    plain = copy.deepcopy(template)
    plain.load_state_dict(state)
    return plain


def total_kl(vd_model: nn.Module) -> torch.Tensor:
    return sum(kl_approx(m.log_alpha()).sum() for m in vd_model.modules() if isinstance(m, VD_TYPES))


def channel_scores(vd_model: nn.Module, structure: Structure,
                   per_group_mean: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(score per channel = 1 - dropped share - tiny * mean log alpha, dropped share per group).

    `per_group_mean` divides each group's scores by their mean (only the ranking within a group then counts).
    """
    mods = dict(vd_model.named_modules())
    dropped, logs, ones = {}, {}, {}
    with torch.no_grad():
        for layer in structure.layers:
            m = mods[layer.name]
            if isinstance(m, VD_TYPES):
                la = m.log_alpha()
                dropped[layer.name] = ((la > m.threshold).float(), None)
                logs[layer.name] = (la, None)
                ones[layer.name] = (torch.ones_like(la), None)
        n = channel_sums(structure, ones)
        share = {g: s / n[g] for g, s in channel_sums(structure, dropped).items()}
        mean_la = {g: s / n[g] for g, s in channel_sums(structure, logs).items()}
    # share moves in steps of 1/n >= 1/(a few thousand); the tie-break stays far below one step
    scores = {g: 1 - share[g] - 1e-6 * (mean_la[g] - LOG_ALPHA_MIN) / (LOG_ALPHA_MAX - LOG_ALPHA_MIN)
              for g in structure.groups}
    if per_group_mean:
        scores = {g: s / s.mean() for g, s in scores.items()}
    group_share = {g: round(float(share[g].mean()), 4) for g in structure.groups}
    return scores, group_share


def sparsity(vd_model: nn.Module) -> float:
    """Share of all VD weights with log alpha above the threshold."""
    dropped = total = 0
    with torch.no_grad():
        for m in vd_model.modules():
            if isinstance(m, VD_TYPES):
                la = m.log_alpha()
                dropped += int((la > m.threshold).sum())
                total += la.numel()
    return dropped / max(1, total)


def vd_train(ctx: SearchContext, vd_model: nn.Module, lr: float, warmup: float,
             checkpoint: Path | None = None) -> dict:
    """Train `vd_model` in place on CE + beta * KL / N with Adam; beta 0 -> 1 over the first `warmup` of steps."""
    cfg = ctx.search_config(lr=lr, optimizer="adam", weight_decay=0.0)
    n = len(ctx.data.train)
    steps_per_epoch = max(1, n // min(cfg.batch_size, n))
    ramp = max(1.0, warmup * steps_per_epoch * cfg.epochs)
    done = int(load_checkpoint(checkpoint)["epoch"]) + 1 if checkpoint is not None and checkpoint.is_file() else 0
    step = [done * steps_per_epoch]

    def regularizer(m: nn.Module) -> torch.Tensor:
        beta = min(1.0, step[0] / ramp)
        step[0] += 1
        return beta * total_kl(m) / n

    return train(vd_model, ctx.data.train, cfg, val_set=ctx.data.val, checkpoint=checkpoint,
                 regularizer=regularizer, desc="variational-dropout")


@register_method("variational-dropout")
def variational_dropout(ctx: SearchContext) -> Proposal:
    """Train a sparse-VD copy of the baseline, remove channels by their dropped share to hit the budget."""
    opts = parse_options("variational-dropout", ctx.options, OPTIONS)
    lr, warmup, log_alpha = opts["lr"], opts["warmup"], opts["log_alpha"]
    sigma_scale, threshold = opts["sigma_lr_mult"], opts["threshold"]
    vd_model = to_variational(ctx.baseline, log_alpha, sigma_scale, threshold)
    ctx.log(f"variational-dropout: lr={lr:g} warmup={warmup:g} log_alpha={log_alpha:g} "
            f"sigma_lr_mult={sigma_scale:g} epochs={ctx.search_epochs}")
    sparsity0 = sparsity(vd_model)
    hist = vd_train(ctx, vd_model, lr, warmup, ctx.state_path("variational_dropout.pt"))
    vd_model.eval()
    score_by = opts["score"]
    if score_by not in ("share", "mean"):
        raise ConfigError(f"--set score={score_by}: choose share or mean")
    scores, group_share = channel_scores(vd_model, ctx.structure, score_by == "mean")
    keep = fit_scores(ctx.structure, scores, ctx.cost, ctx.target_cost, ctx.budget.tolerance,
                      ctx.channel_multiple, allocation=ctx.budget.rule)
    source = to_plain(vd_model, copy_baseline(ctx))
    history = [{"lr": lr, "warmup": warmup, "log_alpha_init": log_alpha, "sigma_lr_mult": sigma_scale,
                "threshold": threshold, "score": score_by, "epochs": ctx.search_epochs, "train": hist["epochs"],
                "weight_sparsity_before": round(sparsity0, 4), "weight_sparsity": round(sparsity(vd_model), 4),
                "dropped_share": group_share, "widths": {g: len(v) for g, v in keep.items()}}]
    return Proposal(keep=keep, source=source, history=history, scores=scores)
