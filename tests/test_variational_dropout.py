"""Sparse Variational Dropout: the KL approximation, the VD layers, the plain copy, and the budget."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats
from torch import nn

from edgecompact.methods import run_method
from edgecompact.methods.variational_dropout import VDConv2d, kl_approx, to_plain, to_variational


def _true_kl(log_alpha: float) -> float:
    """KL(N(theta, alpha theta^2) || log-uniform) = -(0.5 log alpha - E log|eps| + C), eps ~ N(1, alpha).

    C = -(euler_gamma + log 2) / 2 makes it vanish as alpha -> inf (E log|z| = -(gamma + log 2) / 2, z ~ N(0, 1)).
    """
    s = math.sqrt(math.exp(log_alpha))
    lo, hi = 1 - 12 * s, 1 + 12 * s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e_log, _ = integrate.quad(lambda e: math.log(abs(e)) * stats.norm.pdf(e, 1, s), lo, hi,
                                  points=[0.0] if lo < 0 < hi else None, limit=500)
    c = -(0.5772156649015329 + math.log(2)) / 2
    return -(0.5 * log_alpha - e_log + c)


@pytest.mark.parametrize("log_alpha", [-6.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0])
def test_kl_approximation_matches_numerically_integrated_kl(log_alpha: float) -> None:
    approx = kl_approx(torch.tensor(log_alpha, dtype=torch.float64)).item()
    assert approx == pytest.approx(_true_kl(log_alpha), abs=0.01)


def test_kl_approximation_decreases_to_zero_as_log_alpha_grows() -> None:
    la = torch.linspace(-8, 8, 161, dtype=torch.float64)
    kl = kl_approx(la)
    assert torch.all(kl[1:] < kl[:-1])
    assert kl_approx(torch.tensor(40.0, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    # for small alpha the KL grows like -0.5 log alpha (+ constant k1 - k1)
    assert (kl_approx(torch.tensor(-30.0)) - kl_approx(torch.tensor(-40.0))).item() == pytest.approx(-5.0, abs=1e-6)


def test_local_reparameterization_matches_sampling_the_weights() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
    vd = VDConv2d(conv, log_alpha=-1.0).train()
    x = torch.randn(1, 2, 4, 4)
    n = 3000
    with torch.no_grad():
        local = torch.stack([vd(x) for _ in range(n)])
        sigma = (vd.log_alpha().exp() * vd.weight.pow(2)).sqrt()
        sampled = torch.stack([F.conv2d(x, vd.weight + sigma * torch.randn_like(sigma), vd.bias, padding=1)
                               for _ in range(n)])
    se = ((local.var(0) + sampled.var(0)) / n).sqrt()  # standard error of the difference of the means
    assert torch.all((local.mean(0) - sampled.mean(0)).abs() <= 5 * se)
    assert torch.all((local.std(0) / sampled.std(0) - 1).abs() <= 5 / math.sqrt(n))


def test_plain_copy_computes_what_the_vd_net_computes_in_eval(trained_resnet20) -> None:
    torch.manual_seed(0)
    vd = to_variational(trained_resnet20, log_alpha=-4.0, sigma_scale=5.0)
    with torch.no_grad():
        for m in vd.modules():
            if isinstance(m, VDConv2d):
                m.log_sigma2_raw.add_(torch.rand_like(m.log_sigma2_raw) * 3)  # drop a share of the weights
    dropped = sum(int((m.log_alpha() > 3).sum()) for m in vd.modules() if isinstance(m, VDConv2d))
    assert dropped > 1000
    plain = to_plain(vd.eval(), trained_resnet20)
    assert type(plain.conv1) is nn.Conv2d
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), vd(x))
        assert not torch.allclose(plain(x), trained_resnet20(x))


@pytest.mark.slow
def test_variational_dropout_hits_a_flops_budget_within_2_percent(make_context, count_mflops) -> None:
    ctx = make_context("0.33x")
    result = run_method("variational-dropout", ctx)
    assert abs(count_mflops(result.model, ctx) / (ctx.target_cost / 1e6) - 1) <= 0.02
    assert abs(result.metrics["budget"]["error_pct"]) <= 2.0
    assert result.history[0]["weight_sparsity"] > result.history[0]["weight_sparsity_before"]
