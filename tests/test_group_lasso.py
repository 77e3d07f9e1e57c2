"""Group Lasso: the coupled-channel penalty, its gradient, its effect on group norms, and the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgecompact.methods import run_method
from edgecompact.methods.group_lasso import (
    auto_lambda,
    cost_weights,
    group_lasso_penalty,
    penalty_weights,
    slice_norms,
    slice_sizes,
    sparse_train,
)
from edgecompact.structure import analyze


class TinyResidual(nn.Module):
    """stem conv -> BN, a block whose output is added to the stem's (one coupled group), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 2, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn0(self.conv0(x)))
        b = torch.relu(self.bn1(self.conv1(a)))
        y = torch.relu(self.bn2(self.conv2(b)) + a)
        return self.fc(y.mean((2, 3)))


def _tiny() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = TinyResidual()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    structure = analyze(model, (1, 5, 5), "tiny")
    return model.double(), structure


def test_slice_norm_is_the_norm_of_every_coupled_slice_written_out_by_hand() -> None:
    model, structure = _tiny()
    assert sorted(structure.groups.values()) == [2, 3]
    res = next(g for g, w in structure.groups.items() if w == 3)  # conv0/conv2 outputs tied by the add
    mid = next(g for g, w in structure.groups.items() if w == 2)
    norms = slice_norms(model, structure)
    m = model
    for c in range(3):
        parts = [m.conv0.weight[c], m.bn0.weight[c:c + 1], m.bn0.bias[c:c + 1], m.conv2.weight[c],
                 m.bn2.weight[c:c + 1], m.bn2.bias[c:c + 1], m.conv1.weight[:, c], m.fc.weight[:, c]]
        expected = torch.cat([p.flatten() for p in parts]).norm()
        assert norms[res][c].item() == pytest.approx(expected.item(), rel=1e-12)
    for c in range(2):
        parts = [m.conv1.weight[c], m.conv1.bias[c:c + 1], m.bn1.weight[c:c + 1], m.bn1.bias[c:c + 1],
                 m.conv2.weight[:, c]]
        expected = torch.cat([p.flatten() for p in parts]).norm()
        assert norms[mid][c].item() == pytest.approx(expected.item(), rel=1e-12)
    # writer rows + BN gamma/beta + reader columns; the classifier's output rows and bias belong to no group
    assert slice_sizes(model, structure) == {res: 9 + 2 + 2 + 2 + 18 + 2, mid: 27 + 1 + 2 + 3}


def test_penalty_gradient_matches_central_finite_differences() -> None:
    model, structure = _tiny()
    weights = {g: 0.5 + i for i, g in enumerate(structure.groups)}
    params = [p for p in model.parameters()]
    penalty = group_lasso_penalty(model, structure, weights)
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    h = 1e-6
    gen = torch.Generator().manual_seed(1)
    for p, g in zip(params, grads):
        g = torch.zeros_like(p) if g is None else g
        flat = p.data.view(-1)
        for i in torch.randperm(flat.numel(), generator=gen)[:6].tolist():
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + h
                up = group_lasso_penalty(model, structure, weights).item()
                flat[i] = old - h
                down = group_lasso_penalty(model, structure, weights).item()
                flat[i] = old
            assert g.view(-1)[i].item() == pytest.approx((up - down) / (2 * h), abs=1e-7)
    assert grads[-1] is None or torch.all(grads[-1] == 0)  # fc.bias is never penalized


def test_cost_weights_have_mean_one_and_follow_marginal_flops(make_context) -> None:
    ctx = make_context("0.33x")
    w = cost_weights(ctx)
    widths = ctx.structure.groups
    assert sum(w[g] * n for g, n in widths.items()) / sum(widths.values()) == pytest.approx(1.0)
    stem, last = next(iter(widths)), list(widths)[-1]
    saved = {g: ctx.flops(widths) - ctx.flops(dict(widths, **{g: widths[g] - 1})) for g in (stem, last)}
    assert w[stem] / w[last] == pytest.approx(saved[stem] / saved[last], rel=1e-9)


@pytest.mark.slow
def test_group_lasso_drives_group_norms_below_an_unpenalized_run(make_context) -> None:
    ctx = make_context("0.33x", search_epochs=1)
    lr = ctx.finetune.lr
    cw = cost_weights(ctx)
    costliest = max(cw, key=cw.get)
    runs = {}
    for name in ("penalized", "plain"):
        model = copy.deepcopy(ctx.baseline)
        weights = penalty_weights(model, ctx.structure, cw)
        lam = auto_lambda(ctx, cw, lr, 0.5) if name == "penalized" else 0.0
        sparse_train(ctx, model, weights, lam, lr)
        with torch.no_grad():
            runs[name] = (group_lasso_penalty(model, ctx.structure, weights).item(),
                          slice_norms(model, ctx.structure)[costliest].mean().item())
    assert runs["penalized"][0] < 0.9 * runs["plain"][0]
    # strength 0.5: the penalty alone would halve a typical channel of the costliest group
    assert runs["penalized"][1] < 0.75 * runs["plain"][1]


@pytest.mark.slow
def test_group_lasso_hits_a_flops_budget_within_2_percent(make_context, count_mflops) -> None:
    ctx = make_context("0.33x")
    result = run_method("group-lasso", ctx)
    target = ctx.target_cost / 1e6
    assert abs(count_mflops(result.model, ctx) / target - 1) <= 0.02
    assert abs(result.metrics["budget"]["error_pct"]) <= 2.0
    assert result.history[0]["lambda"] > 0
