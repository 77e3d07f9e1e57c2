"""Budgets (FLOPs, parameters or milliseconds on a target) and the width search that lands inside one.

Every method ends here: it scores channels (or proposes widths) and `fit_to_budget` picks the widths whose cost is
within the tolerance of the target. Cost functions are plain callables `widths -> value`; nothing here trains.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from edgecompact.errors import BudgetError, ConfigError
from edgecompact.structure import Structure, round_width

METRICS = ("flops", "params", "latency")
ALLOCATIONS = ("knapsack", "threshold")  # how scored channels are cut to a budget (`fit_scores`)
CostFn = Callable[[dict[str, int]], float]

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    """`value` is absolute (FLOPs, params or ms) unless `relative`, then a fraction of the baseline.

    `allocation`: how scored channels are cut to it (`fit_scores`); None: the knapsack for latency, the global
    threshold for FLOPs and parameters."""

    metric: str
    value: float
    relative: bool
    tolerance: float = 0.02
    allocation: str | None = None

    @property
    def rule(self) -> str:
        """The allocation in force: `allocation`, or the metric's default."""
        return self.allocation or ("knapsack" if self.metric == "latency" else "threshold")

    def target(self, baseline_cost: float) -> float:
        return self.value * baseline_cost if self.relative else self.value

    def describe(self) -> str:
        v = f"{self.value:g}x baseline" if self.relative else _fmt(self.metric, self.value)
        rule = f", {self.allocation} allocation" if self.allocation else ""
        return f"{self.metric} <= {v} (+-{100 * self.tolerance:g}%){rule}"

    def to_dict(self) -> dict:
        out = {"metric": self.metric, "value": self.value, "relative": self.relative, "tolerance": self.tolerance}
        return out if self.allocation is None else {**out, "allocation": self.allocation}


def _fmt(metric: str, v: float) -> str:
    if metric == "latency":
        return f"{v:.3f} ms"
    return f"{v / 1e6:.3f}M" if v >= 1e5 else f"{v:.0f}"


def parse_budget(text: str, metric: str | None = None, tolerance: float = 0.02,
                 allocation: str | None = None) -> Budget:
    """Parse `1/3x` (or `1/3`), `0.33x`, `48M`, `1.2G`, `120k`, `12ms` into a Budget. `metric` defaults from the
    unit (ms -> latency); a fraction `a/b` is relative to the baseline, with or without the `x`."""
    if allocation is not None:
        _check_allocation(allocation)
    return replace(_parse(text, metric, tolerance), allocation=allocation)


def _check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"--allocation: unknown rule '{allocation}' (choose {', '.join(ALLOCATIONS)})")


def _parse(text: str, metric: str | None, tolerance: float) -> Budget:
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"--metric: unknown metric '{metric}' (choose {', '.join(METRICS)})")
    if not 0 < tolerance < 1:
        raise ConfigError(f"--tolerance: {tolerance} must be in (0, 1)")
    s = str(text).strip().lower()
    frac = re.fullmatch(r"([0-9]+)\s*/\s*([0-9]+)\s*x?", s)
    if frac:
        num, den = int(frac.group(1)), int(frac.group(2))
        if num == 0 or den == 0:
            raise BudgetError(f"--budget: {text} must be a fraction > 0")
        if num >= den:
            raise BudgetError(f"--budget: {text} is not below the baseline (use a fraction < 1)")
        return Budget(metric or "flops", num / den, True, tolerance)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|ms|k|m|g|)", s)
    if not m:
        raise ConfigError(f"--budget: cannot read '{text}' (examples: 1/3x, 0.33x, 48M, 120k, 12ms)")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise BudgetError(f"--budget: {text} must be > 0")
    if unit == "x":
        if value >= 1:
            raise BudgetError(f"--budget: {text} is not below the baseline (use a fraction < 1x)")
        return Budget(metric or "flops", value, True, tolerance)
    if unit == "ms":
        if metric not in (None, "latency"):
            raise ConfigError(f"--budget: {text} is a latency but --metric is {metric}")
        return Budget("latency", value, False, tolerance)
    metric = metric or "flops"
    if metric == "latency":
        return Budget("latency", value, False, tolerance)
    return Budget(metric, value * _SUFFIX[unit], False, tolerance)


def check_budget(budget: Budget, baseline_cost: float, min_cost: float) -> float:
    """The absolute target; BudgetError when it is above the baseline or below the smallest reachable cost."""
    target = budget.target(baseline_cost)
    if target >= baseline_cost:
        raise BudgetError(f"--budget: {_fmt(budget.metric, target)} is not below the baseline's "
                          f"{_fmt(budget.metric, baseline_cost)}")
    if target * (1 + budget.tolerance) < min_cost:
        raise BudgetError(f"--budget: {_fmt(budget.metric, target)} is unreachable: the smallest architecture "
                          f"allowed by the constraints costs {_fmt(budget.metric, min_cost)}")
    return target


def min_widths(structure: Structure, multiple: int = 1) -> dict[str, int]:
    """The narrowest architecture: one channel step per group, 0 where a residual block may be removed."""
    return {g: 0 if structure.min_width(g) == 0 else round_width(1, multiple, full)
            for g, full in structure.groups.items()}


def uniform_widths(structure: Structure, ratio: float, multiple: int = 1) -> dict[str, int]:
    return {g: round_width(ratio * full, multiple, full) for g, full in structure.groups.items()}


def within(value: float, target: float, tolerance: float) -> bool:
    return abs(value - target) <= tolerance * target


def fit_uniform(structure: Structure, cost: CostFn, target: float, tolerance: float,
                multiple: int = 1) -> dict[str, int]:
    """One width multiplier on every group, bisected so the cost lands within the tolerance of `target`.

    When no single multiplier lands inside (rounding), the nearest one is refined channel by channel.
    """
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(uniform_widths(structure, mid, multiple)) > target:
            hi = mid
        else:
            lo = mid
    widths = uniform_widths(structure, lo, multiple)
    return _refine(structure, widths, {g: [float(full - i) for i in range(full)] for g, full in
                                       structure.groups.items()}, cost, target, tolerance, multiple)


def fit_to_budget(structure: Structure, scores: dict[str, torch.Tensor], cost: CostFn, target: float,
                  tolerance: float, multiple: int = 1) -> dict[str, list[int]]:
    """Keep the globally highest-scoring channels so the cost lands within the tolerance of `target`.

    Scores must be comparable across groups. Each group keeps its top channels in units of `multiple`; a
    global threshold over unit scores is bisected, then single units are added or removed (cheapest first)
    until the cost is inside the tolerance. A droppable group (`structure.droppable`) whose first unit falls
    below the threshold gets width 0: its residual block is removed. A channel scored -inf is never kept beyond a
    group's smallest width (a block a method removed stays removed). Returns kept channel indices per group.
    """
    ranked = {g: sorted(scores[g].detach().float().tolist(), reverse=True) for g in structure.groups}
    order = {g: torch.argsort(scores[g].detach().float(), descending=True, stable=True).tolist()
             for g in structure.groups}
    floor = min_widths(structure, multiple)

    def widths_at(t: float) -> dict[str, int]:
        out = {}
        for g in structure.groups:
            w = floor[g]
            while (nxt := _up(structure, g, w, multiple)) is not None and ranked[g][nxt - 1] >= t:
                w = nxt
            out[g] = w
        return structure.apply_drops(out)

    thresholds = sorted({v for g in ranked for v in ranked[g] if v != -math.inf}) or [math.inf]
    lo, hi = 0, len(thresholds) - 1  # cost(widths_at(thresholds[i])) decreases with i
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(widths_at(thresholds[mid])) > target:
            lo = mid + 1
        else:
            hi = mid
    widths = _refine(structure, widths_at(thresholds[lo]), ranked, cost, target, tolerance, multiple)
    return {g: sorted(order[g][:w]) for g, w in widths.items()}


def fit_scores(structure: Structure, scores: dict[str, torch.Tensor], cost: CostFn, target: float, tolerance: float,
               multiple: int = 1, *, allocation: str = "threshold") -> dict[str, list[int]]:
    """The allocation every method shares (`Budget.rule`): the knapsack over the cost (`fit_knapsack`; a latency
    budget's default: layers differ in ms per channel) or the global score threshold (`fit_to_budget`)."""
    _check_allocation(allocation)
    fit = fit_knapsack if allocation == "knapsack" else fit_to_budget
    return fit(structure, scores, cost, target, tolerance, multiple)


def fit_knapsack(structure: Structure, scores: dict[str, torch.Tensor], cost: CostFn, target: float,
                 tolerance: float, multiple: int = 1, *, rounds: int = 6, bins: int = 512) -> dict[str, list[int]]:
    """Latency-aware allocation (HALP, Shen et al. 2022): keep the channels of the largest summed score whose cost
    fits `target`, as a multiple-choice knapsack over each group's widths in units of `multiple`.

    A group's choices are its widths from its smallest to full (0 too where its residual block may go, so thinning a
    block and removing it are weighed by their cost). The cost of a network is not a sum over groups (a conv costs by
    its input and its output width), so each round prices every choice of a group with the other groups at the
    current widths (cost(widths with that group changed) - cost(widths)), solves the knapsack by dynamic
    programming over `bins` cost steps, and repeats from the answer until it stops changing (`rounds` at most).
    The best answer within the budget is then refined unit by unit to land inside the tolerance, as `fit_to_budget`
    does. Scores must be comparable across groups; a channel scored -inf is never kept beyond a group's smallest
    width. Returns kept channel indices per group.
    """
    ranked = {g: sorted(scores[g].detach().float().tolist(), reverse=True) for g in structure.groups}
    order = {g: torch.argsort(scores[g].detach().float(), descending=True, stable=True).tolist()
             for g in structure.groups}
    floor = min_widths(structure, multiple)
    choices, values = {}, {}
    for g in structure.groups:
        ws, w = [floor[g]], floor[g]
        while (w := _up(structure, g, w, multiple)) is not None and ranked[g][w - 1] != -math.inf:
            ws.append(w)
        choices[g] = ws
        prefix = [0.0]
        for v in ranked[g]:
            prefix.append(prefix[-1] + (v if v != -math.inf else 0.0))
        values[g] = [prefix[w] for w in ws]
    widths = {g: floor[g] for g in structure.groups}
    best, seen = None, []
    for _ in range(rounds):
        widths = _knapsack_round(structure, choices, values, widths, cost, target, bins)
        if widths in seen:
            break
        seen.append(widths)
        value = sum(values[g][choices[g].index(w)] for g, w in widths.items() if w in choices[g])
        if cost(widths) <= target * (1 + tolerance) and (best is None or value > best[0]):
            best = (value, widths)
    widths = _top_up(structure, best[1] if best else widths, ranked, cost, target, multiple)
    widths = _refine(structure, widths, ranked, cost, target, tolerance, multiple)
    return {g: sorted(order[g][:w]) for g, w in widths.items()}


def _top_up(structure: Structure, widths: dict[str, int], ranked: dict[str, list[float]], cost: CostFn,
            target: float, multiple: int) -> dict[str, int]:
    """Spend what the knapsack's cost steps left: add the unit of most score per added cost while the cost stays
    within `target` (the dynamic programme rounds each choice's cost up to a whole step)."""
    c = cost(widths)
    while True:
        best = None
        for g, w in widths.items():
            nxt = _up(structure, g, w, multiple)
            if nxt is None or w == 0 or ranked[g][nxt - 1] == -math.inf:
                continue
            ct = cost(dict(widths, **{g: nxt}))
            if ct <= target:
                gain = sum(ranked[g][w:nxt])
                ratio = math.inf if ct <= c else gain / (ct - c)
                if best is None or ratio > best[0]:
                    best = (ratio, g, nxt, ct)
        if best is None:
            return widths
        _, g, nxt, c = best
        widths = dict(widths, **{g: nxt})


def _knapsack_round(structure: Structure, choices: dict[str, list[int]], values: dict[str, list[float]],
                    widths: dict[str, int], cost: CostFn, target: float, bins: int) -> dict[str, int]:
    """One knapsack solve with every choice priced at `widths` (the other groups held there)."""
    here = cost(widths)
    deltas = {g: [cost(structure.apply_drops(dict(widths, **{g: w}))) - here for w in choices[g]]
              for g in choices}
    lowest = {g: min(d) for g, d in deltas.items()}
    room = target - here - sum(lowest.values())  # what the groups may spend above their cheapest choices
    if room <= 0:
        return {g: choices[g][deltas[g].index(lowest[g])] for g in choices}
    step = room / bins
    neg = -math.inf
    dp = [0.0] + [neg] * bins  # dp[b]: best value spending exactly b steps
    picks: list[tuple[str, list[int]]] = []
    for g in choices:
        costs = [min(bins + 1, math.ceil((d - lowest[g]) / step - 1e-9)) for d in deltas[g]]
        new, pick = [neg] * (bins + 1), [-1] * (bins + 1)
        for i, (c, v) in enumerate(zip(costs, values[g])):
            for b in range(c, bins + 1):
                if dp[b - c] != neg and dp[b - c] + v > new[b]:
                    new[b], pick[b] = dp[b - c] + v, i
        dp = new
        picks.append((g, pick))
    b = max(range(bins + 1), key=lambda k: dp[k])
    out = {}
    for g, pick in reversed(picks):
        i = pick[b]
        out[g] = choices[g][i]
        b -= min(bins + 1, math.ceil((deltas[g][i] - lowest[g]) / step - 1e-9))
    return structure.apply_drops(out)


def _refine(structure: Structure, widths: dict[str, int], ranked: dict[str, list[float]], cost: CostFn,
            target: float, tolerance: float, multiple: int) -> dict[str, int]:
    """Add the best-scoring units while under the budget, then land inside the tolerance if a step allows it."""
    widths = structure.apply_drops(widths)
    c = cost(widths)
    for _ in range(10_000):
        if within(c, target, tolerance):
            return widths
        if c > target:  # remove the unit with the lowest score that is not a group's last (unless droppable)
            cands = [(ranked[g][w - 1], g) for g, w in widths.items() if _down(structure, g, w, multiple) is not None]
            if not cands:
                break
            _, g = min(cands)
            widths = structure.apply_drops(dict(widths, **{g: _down(structure, g, widths[g], multiple)}))
        else:  # add the best next unit whose cost still fits under the upper edge of the tolerance
            cands = []
            for g, w in widths.items():
                nxt = _up(structure, g, w, multiple)
                if nxt is None or ranked[g][nxt - 1] == -math.inf or \
                        any(widths[o] == 0 for o in _siblings(structure, g) if o != g):
                    continue
                trial = dict(widths, **{g: nxt})
                ct = cost(trial)
                if ct <= target * (1 + tolerance):
                    cands.append((ranked[g][w], -ct, g))
            if not cands:
                break
            _, _, g = max(cands)
            widths[g] = _up(structure, g, widths[g], multiple)
        c = cost(widths)
    return widths


def _siblings(structure: Structure, g: str) -> list[str]:
    return structure.blocks().get(structure.droppable.get(g, ""), [g])


def _up(structure: Structure, g: str, w: int, multiple: int) -> int | None:
    """Width after adding one unit to group `g` at width `w`, or None when it is full."""
    full = structure.groups[g]
    if full == 0:
        return None
    if w == 0:
        return round_width(1, multiple, full)
    if full <= multiple or w + multiple > full:
        return None
    return w + multiple


def _down(structure: Structure, g: str, w: int, multiple: int) -> int | None:
    """Width after removing one unit from group `g` at width `w` (0 only if droppable), or None."""
    if w == 0:
        return None
    full = structure.groups[g]
    if full > multiple and w - multiple >= 1:
        return w - multiple
    return 0 if structure.min_width(g) == 0 else None


def assert_within(budget_metric: str, achieved: float, target: float, tolerance: float, *,
                  measured: bool = False) -> None:
    """BudgetError unless `achieved` is within the tolerance of `target`; `measured`: both are timed ms on the target
    (the latency loop's closest round), not the cost model's prediction."""
    if within(achieved, target, tolerance):
        return
    if measured:
        what = "measured latency"
        why = ("the bounded re-fits did not land inside it (raise --measure-rounds or --tolerance; "
               "--measure-rounds 0 judges the predicted latency)")
    else:
        what, why = budget_metric, "a single channel step is larger than the tolerance"
    raise BudgetError(f"budget not met: closest {what} reached is {_fmt(budget_metric, achieved)} vs target "
                      f"{_fmt(budget_metric, target)} ({100 * (achieved / target - 1):+.1f}%, tolerance "
                      f"{100 * tolerance:g}%): {why}")
