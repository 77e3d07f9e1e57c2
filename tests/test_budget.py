"""Budgets: parsing, impossible budgets, and width fitting that lands inside the tolerance."""

from __future__ import annotations

import pytest
import torch

from edgecompact.budget import fit_scores, fit_to_budget, fit_uniform, parse_budget, within
from edgecompact.errors import BudgetError, ConfigError
from edgecompact.models import create_model
from edgecompact.pipeline import build_context
from edgecompact.structure import analyze


def test_parse_budget_units():
    assert parse_budget("0.33x").relative and parse_budget("0.33x").metric == "flops"
    assert parse_budget("48M").value == 48e6
    assert parse_budget("120k", metric="params").value == 120e3
    b = parse_budget("12ms")
    assert b.metric == "latency" and b.value == 12


def test_a_fraction_is_exactly_that_share_of_the_baseline():
    for text in ("1/3x", "1/3", " 1 / 3x"):
        b = parse_budget(text)
        assert b.relative and b.metric == "flops" and b.value == 1 / 3
    assert parse_budget("1/2", metric="latency").metric == "latency"


@pytest.mark.parametrize("text,err", [("0x", BudgetError), ("-1M", ConfigError), ("1.5x", BudgetError),
                                      ("lots", ConfigError),
                                      ("3/3x", BudgetError), ("1/0", BudgetError)])
def test_bad_budgets_name_the_argument(text, err):
    with pytest.raises(err, match="--budget"):
        parse_budget(text)


def test_the_allocation_is_the_metrics_unless_one_is_named():
    assert parse_budget("0.5x", metric="latency").rule == "knapsack"
    assert parse_budget("1/3x").rule == parse_budget("48M").rule == "threshold"
    named = parse_budget("0.5x", metric="latency", allocation="threshold")
    assert named.rule == "threshold" and named.to_dict()["allocation"] == "threshold"
    assert parse_budget("1/3x", allocation="knapsack").rule == "knapsack"
    with pytest.raises(ConfigError, match="--allocation"):
        parse_budget("0.5x", allocation="greedy")


@pytest.mark.parametrize("text", ["1/3x", "1/3", "0.5x", "48M", "12ms"])
def test_a_bad_tolerance_or_metric_is_refused_whatever_the_budget_form(text):
    with pytest.raises(ConfigError, match="--tolerance"):
        parse_budget(text, tolerance=2)
    with pytest.raises(ConfigError, match="--metric"):
        parse_budget(text, metric="energy")


@pytest.fixture(scope="module")
def r20():
    from edgecompact.cost.flops import arch_flops

    model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    st = analyze(model, (3, 32, 32))
    return st, lambda w: float(arch_flops(st, w))


@pytest.mark.parametrize("frac", [0.2, 0.33, 0.5, 0.8])
@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_fit_to_budget_lands_within_tolerance(r20, frac, multiple):
    st, cost = r20
    target = frac * cost(st.baseline_widths())
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(v, generator=g) for k, v in st.groups.items()}
    _assert_fit(st, scores, cost, target, multiple, fit_to_budget(st, scores, cost, target, 0.02, multiple))


def _assert_fit(st, scores, cost, target, multiple, keep) -> None:
    """Within 2% of the target, widths in steps of the multiple, and the highest-scoring channels kept."""
    widths = {k: len(v) for k, v in keep.items()}
    assert within(cost(widths), target, 0.02)
    assert all(w % multiple == 0 or st.groups[k] <= multiple for k, w in widths.items())
    for k, v in keep.items():
        rest = sorted(set(range(st.groups[k])) - set(v))
        if rest and v:
            assert scores[k][v].min() >= scores[k][rest].max()


def test_fit_uniform_lands_within_tolerance(r20):
    st, cost = r20
    target = 0.33 * cost(st.baseline_widths())
    widths = fit_uniform(st, cost, target, 0.02, 4)
    assert within(cost(widths), target, 0.02)


def test_budget_above_baseline_or_unreachable_is_refused(digits16):
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=16)
    with pytest.raises(BudgetError, match="not below the baseline"):
        build_context(model, digits16, "1e12", baseline_top1=10.0)
    with pytest.raises(BudgetError, match="unreachable"):
        build_context(model, digits16, "0.001x", channel_multiple=8, baseline_top1=10.0)


def _kept_value(scores, keep) -> float:
    return sum(float(scores[g][idx].sum()) for g, idx in keep.items())


@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_knapsack_finds_the_brute_force_optimum_of_an_additive_cost(frac):
    """Two groups with different channel prices: every (w1, w2) is enumerated; the knapsack keeps at least the best
    summed score that fits, where a global score threshold (blind to price) keeps less."""
    from itertools import product

    from edgecompact.budget import fit_knapsack
    from edgecompact.structure import Structure

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(32, 4))
    st: Structure = analyze(model, (1, 12, 12))
    a, b = sorted(st.groups, key=st.groups.get)  # 16 and 32 channels
    price = {a: 5.0, b: 1.0}  # a's channels cost five times b's

    def cost(w):
        return sum(price[g] * w[g] for g in st.groups)

    g = torch.Generator().manual_seed(0)
    scores = {a: 1 + torch.rand(16, generator=g), b: torch.rand(32, generator=g)}  # a scores higher, costs more
    target = frac * cost(st.baseline_widths())
    best = max(sum(sorted(scores[a].tolist(), reverse=True)[:i]) + sum(sorted(scores[b].tolist(), reverse=True)[:j])
               for i, j in product(range(1, 17), range(1, 33)) if cost({a: i, b: j}) <= target)
    keep = fit_knapsack(st, scores, cost, target, 0.02)
    widths = {k: len(v) for k, v in keep.items()}
    assert cost(widths) <= target * 1.02
    assert _kept_value(scores, keep) >= best - 1e-6
    threshold = fit_to_budget(st, scores, cost, target, 0.02)
    assert _kept_value(scores, threshold) < _kept_value(scores, keep)
    # the shared entry point dispatches on the rule named
    assert fit_scores(st, scores, cost, target, 0.02, allocation="knapsack") == keep
    assert fit_scores(st, scores, cost, target, 0.02, allocation="threshold") == threshold


@pytest.mark.parametrize("multiple", [1, 8])
def test_knapsack_lands_within_tolerance_on_a_nonadditive_cost(r20, multiple):
    """FLOPs of ResNet-20 (a conv costs by its input and output widths: not a sum over groups)."""
    from edgecompact.budget import fit_knapsack

    st, cost = r20
    target = 0.5 * cost(st.baseline_widths())
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(v, generator=g) for k, v in st.groups.items()}
    _assert_fit(st, scores, cost, target, multiple, fit_knapsack(st, scores, cost, target, 0.02, multiple))
