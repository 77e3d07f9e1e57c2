"""The closed loop of a latency budget: widths fitted on the predicted latency are timed on the target, paired with
the baseline, and re-fitted at a corrected table target until the *measured* latency is within the tolerance.

It runs once, from `run_method`, for every method: it re-uses the channel scores a method already fitted with, and
never searches or trains. A target that does not run here keeps its budget predicted only, and the record says why.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from edgecompact.budget import fit_scores, within
from edgecompact.errors import BudgetError
from edgecompact.storage import read_json, write_text_atomic
from edgecompact.structure import Structure, slim, widths_of

if TYPE_CHECKING:
    from edgecompact.budget import Budget
    from edgecompact.data import DataSplits
    from edgecompact.targets import Target

MEASURE_ROUNDS = 3  # timed rounds at most: the method's own widths, then re-fits (`--measure-rounds`)

Measure = Callable[[dict[str, list[int]]], tuple[float, float]]  # keep -> (baseline ms, compact ms), paired


def measurer_for(target: Target, baseline: nn.Module, structure: Structure, precision: str, data: DataSplits,
                 rounds: int = MEASURE_ROUNDS, rpc: tuple[str, int, str] | None = None
                 ) -> tuple[Measure | None, str]:
    """(the measurement of `target`'s runtime and its key, e.g. "host-ort", "rpi4-tvm-rpc"), or (None, why the
    latency stays predicted only). A target that runs here is timed here on its runtime; a board is timed over
    `rpc` (tracker host, port, key) with the TVM library deploy ships for it (untuned, as deploy builds a board's
    library without a tuning database)."""
    if rounds < 1:
        return None, "--measure-rounds 0: predicted only"
    if not target.runnable_here:
        if rpc is None:
            return None, f"target {target.name} does not run here and no --rpc board was given: predicted only"
        if precision != "fp32":
            return None, f"--precision {precision}: the loop times boards in fp32 only: predicted only"
        return tvm_rpc_measure(baseline, structure, target, rpc), f"{target.name}-tvm-rpc"
    if target.runtime != "onnxruntime":
        return None, (f"target {target.name} ships {target.runtime}; the loop times onnxruntime only: "
                      "predicted only")
    calib = None
    if precision == "int8":
        from edgecompact.precision import calibration_inputs

        calib = calibration_inputs(data.train).numpy()
    return ort_measure(baseline, structure, precision, calib), f"{target.name}-ort"


def ort_measure(baseline: nn.Module, structure: Structure, precision: str = "fp32", calib: np.ndarray | None = None,
                runs: int | None = None, threads: int = 1) -> Measure:
    """Time `slim(baseline, keep)` and the baseline in onnxruntime as deploy ships them at `precision`, by deploy's
    protocol (batch 1, median of `runs` (default and at least bench.MIN_RUNS) interleaved runs, `threads` threads,
    this process). The weights are the baseline's: inference time does not depend on their values."""
    from edgecompact.deploy.bench import MIN_RUNS, time_ort_pair
    from edgecompact.deploy.onnx import ship_onnx

    runs = max(MIN_RUNS, runs or MIN_RUNS)

    x = np.random.default_rng(0).standard_normal((1, *structure.input_shape)).astype(np.float32)

    def measure(keep: dict[str, list[int]]) -> tuple[float, float]:
        with tempfile.TemporaryDirectory(prefix="edgecompact-measure-") as tmp:
            paths = [Path(tmp) / "baseline.onnx", Path(tmp) / "compact.onnx"]
            # a copy: export sets eval() on the module it exports
            for model, path in zip((copy.deepcopy(baseline), slim(baseline, structure, keep)), paths):
                ship_onnx(model, structure.input_shape, precision, path, calib=calib)
            return time_ort_pair(paths[0], paths[1], x, runs, threads)

    return measure


def tvm_rpc_measure(baseline: nn.Module, structure: Structure, target: Target, rpc: tuple[str, int, str],
                    runs: int | None = None) -> Measure:
    """Time `slim(baseline, keep)` and the baseline on a board under the RPC key: both compiled by deploy's TVM
    path for `target` (cross-compiled where it says so), run in one session, interleaved (bench.MIN_RUNS rounds
    at least). The baseline is compiled once."""
    from edgecompact import rpc as ec_rpc
    from edgecompact.deploy.artifact import compile_onnx
    from edgecompact.deploy.bench import MIN_RUNS, time_tvm_rpc_pair
    from edgecompact.deploy.onnx import ship_onnx
    from edgecompact.deploy.tvm import export_library, tvm_target

    runs = max(MIN_RUNS, runs or MIN_RUNS)
    x = np.random.default_rng(0).standard_normal((1, *structure.input_shape)).astype(np.float32)
    device_type = tvm_target(target).get_target_device_type()
    work = tempfile.TemporaryDirectory(prefix="edgecompact-measure-rpc-")
    libs: dict[str, Path] = {}

    def library(name: str, model: nn.Module) -> Path:
        onnx_path = Path(work.name) / f"{name}.onnx"
        ship_onnx(model, structure.input_shape, "fp32", onnx_path)
        return export_library(compile_onnx(onnx_path, target), Path(work.name) / f"{name}.so", target)

    def measure(keep: dict[str, list[int]]) -> tuple[float, float]:
        if "baseline" not in libs:
            libs["baseline"] = library("baseline", copy.deepcopy(baseline))
        compact = library("compact", slim(baseline, structure, keep))
        board = ec_rpc.request_board(rpc[:2], rpc[2], ec_rpc.REQUEST_TIMEOUT_S)
        return time_tvm_rpc_pair(libs["baseline"], compact, x, board, runs, device_type)

    return measure


class LoopContext(Protocol):
    """What the loop reads of a search (methods.base.SearchContext has it; named here so that the loop does not
    import the method machinery that calls it)."""

    budget: Budget
    structure: Structure
    cost: Callable[[dict[str, int]], float]
    target_cost: float
    baseline_cost: float
    channel_multiple: int
    measure_latency: Measure | None
    measure_rounds: int
    measure_note: str
    log: Callable[[str], None]

    def state_path(self, name: str) -> Path | None: ...


def close_loop(ctx: LoopContext, keep: dict[str, list[int]], scores: dict[str, torch.Tensor] | None,
               refit: Callable[[float], dict[str, list[int]]] | None = None) -> tuple[dict[str, list[int]], dict]:
    """(the channels to keep, the measured side of the budget for metrics["budget"]).

    Round 1 times the method's own widths. While the measured ms miss the tolerance of the measured target (a
    relative budget: target / baseline cost x the baseline's ms of the same pair; an absolute one: its ms) and
    rounds remain, the table target is corrected (`next_table_target`) and the widths are re-fitted: by the
    method's own rule where it gives one (`refit`: the controls' single multiplier), else from its scores by
    `fit_scores` (the budget's allocation, by default the knapsack; at a tighter tolerance where it returns a
    network already timed, `untimed_fit`). The first round inside the tolerance is kept, else the closest one.
    A budget on another metric: (keep, {}). Without a measurement: (keep, {"measured": False, ...why}).
    """
    if ctx.budget.metric != "latency":
        return keep, {}
    if not measures(ctx):
        return keep, {"measured": False, "predicted_only": ctx.measure_note or "no measurement of the target here"}
    state = ctx.state_path("latency_loop.json")
    config = {"method_keep": keep, "target_cost": ctx.target_cost, "tolerance": ctx.budget.tolerance,
              "rounds": ctx.measure_rounds}
    if state is not None and state.is_file():  # a resumed run trains the widths it chose before (timing is noisy)
        saved = read_json(state)
        if saved.get("config") == json.loads(json.dumps(config)):
            return saved["keep"], saved["budget"]
    tol, rounds, keeps, stop = ctx.budget.tolerance, [], [], None
    table_target, rule = ctx.target_cost, ""
    for k in range(ctx.measure_rounds):
        if k:
            if scores is None and refit is None:
                stop = "the method gives no channel scores to re-fit from"
                break
            table_target, rule = next_table_target(rounds)
            try:  # the method's own fitting rule if it has one (the controls stay uniform), else the allocation
                keep = refit(table_target) if refit is not None else untimed_fit(ctx, scores, table_target, keeps)
            except BudgetError as e:
                stop = f"the re-fit cannot land on {table_target:.4f} ms: {e}"
                break
            if keep is None or keep in keeps:
                stop = "the re-fit gives widths already timed"
                break
        base_ms, ms = ctx.measure_latency(keep)
        target_ms = ctx.target_cost / ctx.baseline_cost * base_ms if ctx.budget.relative else ctx.target_cost
        rounds.append({"round": k + 1, "table_target_ms": table_target, "predicted_ms": ctx.cost(widths_of(keep)),
                       "baseline_ms": base_ms, "measured_ms": ms, "target_ms": target_ms,
                       "error_pct": 100 * (ms / target_ms - 1)})
        if k:
            rounds[-1]["correction"] = rule
        keeps.append(keep)
        ctx.log(f"measured latency, round {k + 1}: {ms:.4f} ms vs target {target_ms:.4f} ms "
                f"({rounds[-1]['error_pct']:+.1f}%; table predicted {rounds[-1]['predicted_ms']:.4f} ms, baseline "
                f"{base_ms:.4f} ms)")
        if within(ms, target_ms, tol):
            break
    best = min(range(len(rounds)), key=lambda i: (not within(rounds[i]["measured_ms"], rounds[i]["target_ms"], tol),
                                                  abs(rounds[i]["error_pct"]), i))
    rounds = [{key: round(v, 2 if key == "error_pct" else 4) if isinstance(v, float) else v for key, v in r.items()}
              for r in rounds]
    chosen = rounds[best]
    record = {"measured": True, "measured_on": ctx.measure_note, "measured_ms": chosen["measured_ms"],
              "measured_error_pct": chosen["error_pct"], "measured_target_ms": chosen["target_ms"],
              "measured_baseline_ms": chosen["baseline_ms"], "round": chosen["round"], "rounds": rounds}
    if stop is not None:
        record["stopped"] = stop
    if state is not None:
        write_text_atomic(state, json.dumps({"config": config, "keep": keeps[best], "budget": record}, indent=1))
    return keeps[best], record


def measures(ctx: LoopContext) -> bool:
    """Whether `close_loop` times a method's widths on the target (and may re-fit them): a latency budget with a
    measurement and at least one round. A method may then hand it a network just outside the tolerance."""
    return ctx.budget.metric == "latency" and ctx.measure_latency is not None and ctx.measure_rounds >= 1


def untimed_fit(ctx: LoopContext, scores: dict[str, torch.Tensor], table_target: float,
                timed: list[dict[str, list[int]]]) -> dict[str, list[int]] | None:
    """The scores cut to `table_target` by the budget's allocation, at widths not timed yet (None if there are none).

    Two timed rounds that straddle the measured band (in steps of 16: -7.7%, then +5.7%) put the corrected target
    between them, and a fit inside the budget's tolerance of it may return one of them again. The fit is then
    repeated at a half and a quarter of the tolerance, which only a network between the two can meet. A BudgetError
    of the first fit is the caller's; at a tighter tolerance it means there is no such network."""
    tol = ctx.budget.tolerance
    for k, t in enumerate((tol, tol / 2, tol / 4)):
        try:
            keep = fit_scores(ctx.structure, scores, ctx.cost, table_target, t, ctx.channel_multiple,
                              allocation=ctx.budget.rule)
        except BudgetError:
            if not k:
                raise
            return None
        if keep not in timed:
            return keep
    return None


def next_table_target(rounds: list[dict]) -> tuple[float, str]:
    """(the predicted ms to fit next, the rule): where the measured error should vanish.

    "ratio": predicted x target ms / measured ms, exact when measured ms are proportional to predicted ones. From the
    second round "secant": the line through the last two rounds' (predicted, measured / target), which also removes
    an offset the table lacks (a small model's per-call overhead makes the ratio step creep). Timing noise must not
    throw it far: its factor on the predicted ms is held between the ratio step's to the powers 1/4 and 4, and a
    slope that is not positive, or under a quarter of the proportional one (e / p: measured ms that hardly moved
    while the prediction did, which is noise or a table miss, not a trend), falls back to the ratio step.
    """
    p, e = rounds[-1]["predicted_ms"], rounds[-1]["measured_ms"] / rounds[-1]["target_ms"]
    if len(rounds) < 2:
        return p / e, "ratio"
    p0, e0 = rounds[-2]["predicted_ms"], rounds[-2]["measured_ms"] / rounds[-2]["target_ms"]
    if p == p0 or (e - e0) / (p - p0) < 0.25 * e / p:
        return p / e, "ratio"
    secant = p + (1 - e) * (p - p0) / (e - e0)
    lo, hi = sorted((e ** -0.25, e ** -4))
    return p * min(hi, max(lo, secant / p)), "secant"
