"""The method interface: what every compact-architecture search method receives and returns.

A method is a function `(SearchContext) -> Proposal`: it decides which channels to keep (and from which weights).
Slimming, the final training, measuring and budget checks are done once, here, in `run_method`; method files hold
only what makes that method itself.

The final training of a found architecture (`SearchContext.final`): "inherit" fine-tunes the slimmed network from
the weights the method proposes; "scratch" re-initializes it and trains it for the protocol's whole epoch budget
(baseline + search + fine-tune epochs, the baseline's learning rate: Liu et al. 2019's Scratch-E); "best" runs
both and keeps the one with the higher top-1 on the validation split (never the test split).

A latency budget on a target that runs here is judged on measured ms (`latency_loop.close_loop`): widths re-fitted
there from the method's `Proposal.scores` replace the proposal's, and a network the method already fine-tuned at
other widths gives way to the inherit path from its source.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from edgecompact.budget import Budget, CostFn, assert_within
from edgecompact.data import DataSplits
from edgecompact.errors import ConfigError
from edgecompact.latency_loop import MEASURE_ROUNDS, Measure, close_loop
from edgecompact.models.blocks import ChannelBias
from edgecompact.structure import ArchSpec, Structure, check_widths, slim, widths_of
from edgecompact.train import TrainConfig, evaluate, train


@dataclass
class SearchContext:
    """Everything a method may use. `cost` measures the budget's metric; `flops`/`params` are always there."""

    baseline: nn.Module  # trained baseline (methods must not modify it: copy first)
    structure: Structure
    data: DataSplits
    budget: Budget
    cost: CostFn
    target_cost: float
    baseline_cost: float
    flops: CostFn
    params: CostFn
    finetune: TrainConfig  # the fine-tune schedule every method (and control) gets
    search_epochs: int = 4  # epochs of sparsity training / shrinking a method may spend
    scratch: TrainConfig | None = None  # from-scratch schedule (all the protocol's epochs); None: not available
    final: str = "inherit"  # final training of the found architecture: "inherit", "scratch" or "best"
    channel_multiple: int = 1
    precision: str = "fp32"
    latency: CostFn | None = None  # predicted ms on the target, when a table (or estimate) exists
    measure_latency: Measure | None = None  # keep -> (baseline ms, compact ms) timed paired on the target, here
    measure_rounds: int = MEASURE_ROUNDS  # timed rounds of a latency budget (0: predicted only)
    measure_note: str = ""  # where measure_latency times (e.g. "host-ort"), or why a latency budget is predicted only
    baseline_top1: float | None = None
    run_dir: Path | None = None  # method state and history go here (resumable)
    seed: int = 0
    options: dict = field(default_factory=dict)  # method-specific settings from the CLI (--set key=value)
    log: Callable[[str], None] = print

    def search_config(self, **overrides) -> TrainConfig:
        """The training config for a method's search phase: fine-tune settings with `search_epochs`."""
        return replace(self.finetune, epochs=self.search_epochs, **overrides)

    def state_path(self, name: str) -> Path | None:
        return None if self.run_dir is None else Path(self.run_dir) / "search" / name


@dataclass
class Proposal:
    """What a method returns: kept channels per group, and the weights to slim them from."""

    keep: dict[str, list[int]]
    source: nn.Module  # the model whose weights the compact model inherits (a copy of the baseline, or trained)
    history: list[dict] = field(default_factory=list)
    from_scratch: bool = False  # re-initialize the slimmed model before fine-tuning (MorphNet's weights=scratch)
    finetuned: bool = False  # the method already fine-tuned the slimmed model (GenSynth's final fine-tune)
    compact: nn.Module | None = None  # when finetuned: the trained compact model
    extra_finetune_epochs: int = 0  # controls: fine-tune longer so every method gets the same total epochs
    final: str | None = None  # controls fix their final training ("inherit" or "scratch"); None: ctx.final
    # per-channel importances over the baseline's channels, comparable across groups (what the method fitted the
    # budget with): the measured latency loop re-fits widths from them; None: the widths cannot be re-fitted
    scores: dict[str, torch.Tensor] | None = None
    # how the method itself fits widths to a cost target (the controls: their one multiplier), so that a re-fit to
    # a measured latency keeps the method's own rule; None: the shared allocation from `scores` (`fit_scores`)
    refit: Callable[[float], dict[str, list[int]]] | None = None


@dataclass
class SearchResult:
    method: str
    arch: ArchSpec
    model: nn.Module
    metrics: dict
    history: list[dict]


Method = Callable[[SearchContext], Proposal]
_METHODS: dict[str, Method] = {}
_USES_LATENCY: set[str] = set()


def register_method(name: str, *, uses_latency: bool = False) -> Callable[[Method], Method]:
    """Register `fn` as method `name`; `uses_latency`: it weighs channels by the target's measured milliseconds
    (a search with it profiles the target on first use, as a latency budget does)."""
    def deco(fn: Method) -> Method:
        _METHODS[name] = fn
        if uses_latency:
            _USES_LATENCY.add(name)
        return fn

    return deco


def uses_latency(name: str) -> bool:
    _load_all()
    return name in _USES_LATENCY


def list_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"--method: unknown method '{name}' (choose {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def _load_all() -> None:
    import importlib
    import pkgutil

    import edgecompact.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base":
            importlib.import_module(f"edgecompact.methods.{info.name}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_options(method: str, given: dict, defaults: dict[str, object]) -> dict:
    """A method's `--set key=value` options, typed like `defaults`: bool (true/false, 1/0, yes/no, on/off), int,
    float or str; a default of None takes a float when given and stays None otherwise. An unknown key or a value of
    the wrong type is a ConfigError naming it."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: not a {method} option (known: {', '.join(defaults)})")
    out = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        kind = float if default is None else type(default)
        if value is None or isinstance(value, kind) and not (kind is float and isinstance(value, bool)):
            out[key] = value
            continue
        text = str(value).strip().lower()
        try:
            if kind is bool:
                if text not in _TRUE + _FALSE:
                    raise ValueError
                out[key] = text in _TRUE
            else:
                out[key] = kind(str(value).strip())
        except ValueError:
            expected = "true or false" if kind is bool else kind.__name__
            raise ConfigError(f"--set {key}={value}: expected {expected}") from None
    return out


def marginal_costs(cost: CostFn, structure: Structure, widths: dict[str, int], step: int = 1) -> dict[str, float]:
    """Cost saved by removing `step` channels of each group at `widths` (per channel)."""
    base = cost(widths)
    out = {}
    for g, w in widths.items():
        s = min(step, w - 1) if w > 1 else 0
        out[g] = (base - cost(dict(widths, **{g: w - s}))) / s if s else cost(widths) / max(1, sum(widths.values()))
    return out


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, seeded, as the zoo (and torchvision's ResNets) initialize them: convs Kaiming-normal
    (fan_out, ReLU), BatchNorm gamma 1 / beta 0 with fresh running statistics, a removed branch's constant 0,
    every other layer its own `reset_parameters`."""
    torch.manual_seed(seed)
    for m in model.modules():
        if m is model:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, ChannelBias):
            nn.init.zeros_(m.bias)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


FINALS = ("inherit", "scratch", "best")


def run_method(name: str, ctx: SearchContext) -> SearchResult:
    """Run one method end to end: propose, check the budget, slim, train the found network, measure."""
    t0 = time.perf_counter()
    final = ctx.final
    if final not in FINALS:
        raise ConfigError(f"--final {final}: choose {', '.join(FINALS)}")
    proposal = get_method(name)(ctx)
    check_widths(ctx.structure, widths_of(proposal.keep), ctx.channel_multiple)
    keep, measured = close_loop(ctx, proposal.keep, proposal.scores, proposal.refit)
    if keep != proposal.keep:
        proposal = _refitted(proposal, keep)
    widths = widths_of(proposal.keep)
    if measured.get("measured"):
        assert_within(ctx.budget.metric, measured["measured_ms"], measured["measured_target_ms"],
                      ctx.budget.tolerance, measured=True)
    else:
        assert_within(ctx.budget.metric, ctx.cost(widths), ctx.target_cost, ctx.budget.tolerance)
    final = proposal.final or final
    if final != "inherit" and ctx.scratch is None:
        raise ConfigError(f"--final {final}: this context has no from-scratch schedule (SearchContext.scratch)")
    candidates: dict[str, nn.Module] = {}
    if final in ("inherit", "best"):
        candidates["inherit"] = _inherit(name, ctx, proposal)
    if final in ("scratch", "best"):
        candidates["scratch"] = _scratch(name, ctx, proposal)
    val = {k: evaluate(m, ctx.data.val) for k, m in candidates.items()}
    chosen = max(candidates, key=lambda k: (val[k], k == "inherit"))  # a tie keeps the inherited network
    model = candidates[chosen].eval()
    metrics = measure(ctx, widths, model)
    metrics["budget"].update(measured)
    metrics["final"] = chosen
    metrics["final_val_top1"] = {k: round(v, 2) for k, v in val.items()}
    metrics["wall_s"] = round(time.perf_counter() - t0, 1)
    history = [*proposal.history, {"final": chosen, "val_top1": metrics["final_val_top1"]}]
    return SearchResult(name, ArchSpec(ctx.structure.model_name, widths, proposal.keep), model, metrics, history)


def _refitted(proposal: Proposal, keep: dict[str, list[int]]) -> Proposal:
    """The proposal at the widths the measured loop re-fitted: a network the method fine-tuned at its own widths
    no longer applies, so the inherit path slims the proposal's source instead."""
    entry = {"refitted": "widths re-fitted to the measured latency budget", "widths": widths_of(keep)}
    return replace(proposal, keep=keep, finetuned=False, compact=None, history=[*proposal.history, entry])


def _teacher(ctx: SearchContext, cfg: TrainConfig) -> nn.Module | None:
    return ctx.baseline if cfg.distill_alpha > 0 else None


def _inherit(name: str, ctx: SearchContext, proposal: Proposal) -> nn.Module:
    """The found network fine-tuned from the weights the method proposes (or as the method already trained it)."""
    if proposal.finetuned and proposal.compact is not None:
        return proposal.compact
    model = slim(proposal.source, ctx.structure, proposal.keep)
    if proposal.from_scratch:
        reinitialize(model, ctx.seed)
    final_finetune(ctx, model, _ckpt(ctx, "finetune.pt"), f"{name} fine-tune", proposal.extra_finetune_epochs)
    return model


def final_finetune(ctx: SearchContext, model: nn.Module, checkpoint: Path | None, desc: str,
                   extra_epochs: int = 0) -> None:
    """Fine-tune a found network in place on the common schedule (`ctx.finetune`, distilling the baseline when the
    run does), resumable from `checkpoint`: the inherit path's training, and a method's own when it judges the
    trained network itself (GenSynth's 1_r)."""
    cfg = replace(ctx.finetune, epochs=ctx.finetune.epochs + extra_epochs)
    train(model, ctx.data.train, cfg, val_set=ctx.data.val, checkpoint=checkpoint, teacher=_teacher(ctx, cfg),
          desc=desc)


def _scratch(name: str, ctx: SearchContext, proposal: Proposal) -> nn.Module:
    """The found architecture, randomly initialized and trained for the protocol's whole epoch budget."""
    assert ctx.scratch is not None
    model = reinitialize(slim(copy_baseline(ctx), ctx.structure, proposal.keep), ctx.seed)
    train(model, ctx.data.train, ctx.scratch, val_set=ctx.data.val, checkpoint=_ckpt(ctx, "scratch.pt"),
          teacher=_teacher(ctx, ctx.scratch), desc=f"{name} from scratch")
    return model


def _ckpt(ctx: SearchContext, name: str) -> Path | None:
    return None if ctx.run_dir is None else Path(ctx.run_dir) / name


def measure(ctx: SearchContext, widths: dict[str, int], model: nn.Module) -> dict:
    """The paper's figures for one architecture: MFLOPs, params, top-1 (test split, else val), budget error.

    Below fp32, `top1` is onnxruntime's own on the model deploy ships (this machine's int8 settings), with the
    search's fast proxy (fake quantization / torch in half) beside it as `top1_proxy`."""
    test = ctx.data.report_split
    achieved = ctx.cost(widths)
    top1_fp32 = evaluate(model, test)
    out = {
        "mflops": round(ctx.flops(widths) / 1e6, 3),
        "params": int(ctx.params(widths)),
        "top1": round(top1_fp32, 2),
        "budget": {"metric": ctx.budget.metric, "target": _round(ctx.budget.metric, ctx.target_cost),
                   "achieved": _round(ctx.budget.metric, achieved),
                   "error_pct": round(100 * (achieved / ctx.target_cost - 1), 2)},
    }
    if ctx.precision != "fp32":
        from edgecompact.cpu import int8_scheme
        from edgecompact.deploy.onnx import runtime_top1
        from edgecompact.precision import calibration_inputs, evaluate_at_precision

        calib, scheme = calibration_inputs(ctx.data.train), int8_scheme()
        out["top1"] = round(runtime_top1(model, test, ctx.precision, calib, scheme=scheme), 2)
        out["top1_proxy"] = round(evaluate_at_precision(model, test, ctx.precision, calib, scheme), 2)
        out["precision"] = ctx.precision
        out["top1_fp32"] = round(top1_fp32, 2)
        out["top1_runtime"] = "onnxruntime"
        if ctx.precision == "int8":
            out["int8"] = scheme.to_dict()
    if ctx.latency is not None:
        out["latency_ms"] = {"predicted": round(ctx.latency(widths), 4)}
    return out


def _round(metric: str, v: float) -> float:
    return round(v / 1e6, 3) if metric == "flops" else (round(v, 4) if metric == "latency" else int(v))


def copy_baseline(ctx: SearchContext) -> nn.Module:
    return copy.deepcopy(ctx.baseline)
