"""Generative Synthesis (Wong et al. 2018, "FermiNets"; Shafiee et al. 2020 sec. 2.4): a generator-inquisitor pair.

The generator G (keep logits over the baseline's channels, plus the weights of the network it refines) synthesizes
concrete architectures from seeds. The inquisitor I probes each synthesized, briefly fine-tuned network with stimuli
(training batches and per-channel perturbations), measures every channel's contribution to the loss, and its
insights move G's logits. U (NetScore) ranks candidates; the indicator 1_r (budget on the target, accuracy at the
deployment precision, channel multiple) decides which are acceptable. Cycles follow a geometric compaction schedule
from the baseline's cost down to the budget. Grouping, slimming and budget fitting are the shared ones
(structure.py, budget.py); the design and every choice the papers leave open are in docs/gensynth.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from edgecompact.budget import CostFn, fit_scores, within
from edgecompact.errors import BudgetError, ConfigError
from edgecompact.latency_loop import measures
from edgecompact.methods.base import (
    Proposal,
    SearchContext,
    final_finetune,
    marginal_costs,
    parse_options,
    register_method,
)
from edgecompact.precision import calibration_inputs, evaluate_at_precision
from edgecompact.storage import write_text_atomic
from edgecompact.structure import Structure, check_widths, part_slices, slim, widths_of
from edgecompact.train import evaluate, load_checkpoint, recalibrate_bn, save_atomic, train

OPTIONS: dict[str, object] = {
    "cycles": 4,  # K: compaction cycles, geometric steps from the baseline's cost to the budget
    "samples": 4,  # networks synthesized per cycle (seeds); sample 0 is G's mode (no noise)
    "steps": 0,  # fine-tune steps per trained network; 0: search_epochs of training spread over the cycles
    # weight of the prototype's soft outputs in the cycles' fine-tunes; "distill": the run's --distill weight, so
    # that GenSynth distils exactly when every other method does (the final training follows --distill)
    "mimic": "distill",
    "train": "best",  # which samples a cycle fine-tunes: "best" (the selected one, after screening) or "all"
    "screen": "utility",  # train=best: rank untrained samples by "utility" (U) or "loss" (on the stimuli)
    "utility": "netscore",  # U: "netscore" (m = MACs), "netscore-latency" (m = predicted ms) or "top1"
    "accuracy_tolerance": 1.0,  # 1_r: top-1 points (at the deployment precision) below the baseline's val top-1
    "temperature": 0.5,  # Gumbel noise scale of G's sampling (theta_G)
    "step": 0.5,  # eta: how far one cycle's insights move G's logits (theta_I)
    "elite": 0.5,  # fraction of the acceptable samples whose insights update G (cross-entropy method)
    "probe": "taylor",  # I's perturbation: "taylor" (first-order |a dL/da|) or "ablation" (zero each channel)
    "probe_batches": 4,  # I's stimuli: this many fixed training batches
    "marginal_step": 16,  # channels removed to measure a group's marginal cost (at least the channel multiple)
    "calib": 256,  # int8 calibration inputs (the deploy stage's count)
    "strict": False,  # raise BudgetError instead of returning a network that misses the accuracy requirement
}
UTILITIES = ("netscore", "netscore-latency", "top1")
PROBES = ("taylor", "ablation")
TRAIN = ("best", "all")
SCREENS = ("utility", "loss")
HARD = ("budget", "multiple")  # constraints no returned network may break, even with the accuracy relaxed


def options(ctx: SearchContext) -> dict:
    """The method's options from `ctx.options` (`--set key=value`), typed like the defaults, checked."""
    out = parse_options("gensynth", ctx.options, OPTIONS)
    if out["mimic"] == "distill":
        out["mimic"] = ctx.finetune.distill_alpha
    try:
        out["mimic"] = float(out["mimic"])
    except ValueError:
        raise ConfigError(f"--set mimic={out['mimic']}: expected a weight in [0, 1] or 'distill'") from None
    checks = [("cycles", out["cycles"] >= 1), ("samples", out["samples"] >= 1), ("steps", out["steps"] >= 0),
              ("utility", out["utility"] in UTILITIES), ("accuracy_tolerance", out["accuracy_tolerance"] >= 0),
              ("temperature", out["temperature"] >= 0), ("step", 0 < out["step"] <= 1),
              ("elite", 0 < out["elite"] <= 1), ("probe", out["probe"] in PROBES), ("train", out["train"] in TRAIN),
              ("screen", out["screen"] in SCREENS),
              ("probe_batches", out["probe_batches"] >= 1), ("mimic", 0 <= out["mimic"] <= 1),
              ("marginal_step", out["marginal_step"] >= 1),
              ("calib", out["calib"] >= 1)]
    for key, ok in checks:
        if not ok:
            choices = {"utility": UTILITIES, "probe": PROBES, "train": TRAIN, "screen": SCREENS}
            allowed = f" (choose {', '.join(choices[key])})" if key in choices else ""
            raise ConfigError(f"--set {key}={out[key]}: out of range{allowed}")
    if out["utility"] == "netscore-latency" and ctx.latency is None:
        raise ConfigError("--set utility=netscore-latency needs --target (a latency table or roofline estimate)")
    return out


# ---- U: the universal performance function ------------------------------------------------------------------

def netscore(top1: float, params_m: float, macs: float, alpha: float = 2.0, beta: float = 0.5,
             gamma: float = 0.5) -> float:
    """NetScore (Wong 2018): 20 log10(a^alpha / (p^beta m^gamma)); a = top-1 %, p = M params, m = G MACs (or ms)."""
    return 20 * math.log10(max(top1, 1e-6) ** alpha / (params_m ** beta * macs ** gamma))


def utility(record: dict, kind: str) -> float:
    """U of an assessed network: NetScore with m = MACs in billions (FLOPs / 2) or the target's predicted ms; or
    plain top-1 ("top1": every candidate sits on the same cost level, so only accuracy separates them)."""
    if kind == "top1":
        return record["top1"]
    m = record["flops"] / 2 / 1e9 if kind == "netscore" else record["ms"]
    return netscore(record["top1"], record["params"] / 1e6, m)


# ---- 1_r: the indicator of the operational requirements --------------------------------------------------------

@dataclass(frozen=True)
class Requirement:
    """r: what 1_r checks. `level` is the cost this cycle must land on (the last cycle's is the budget)."""

    level: float
    tolerance: float  # budget tolerance, a fraction of `level`
    channel_multiple: int
    min_top1: float  # baseline val top-1 (fp32) minus the accuracy tolerance
    precision: str  # the deployment precision accuracy must be measured at


def indicator(record: dict, req: Requirement, structure: Structure) -> list[str]:
    """The requirements `record` violates ("budget", "multiple", "accuracy", "precision"); 1_r = 1 iff none.

    "accuracy": even the fp32 network misses `min_top1`; "precision": fp32 meets it but the network at the
    deployment precision does not, or the accuracy was not measured at the deployment precision.
    """
    out = []
    if not within(record["cost"], req.level, req.tolerance):
        out.append("budget")
    try:
        check_widths(structure, record["widths"], req.channel_multiple)
    except (BudgetError, ConfigError):
        out.append("multiple")
    if record["top1_fp32"] < req.min_top1:
        out.append("accuracy")
    elif record["precision"] != req.precision or record["top1"] < req.min_top1:
        out.append("precision")
    return out


# ---- G: the generator ----------------------------------------------------------------------------------------

@dataclass
class Generator:
    """theta_G: keep logits over every baseline channel, and the network G refines (its channels and weights).

    Logits are log(contribution per unit of marginal cost), centred, so they are comparable across groups: a
    global threshold on them is a greedy knapsack over the budget. G's current network is the best acceptable one
    of the last cycle; what G synthesizes next is a subset of its channels (progressive compaction).
    """

    logits: dict[str, torch.Tensor]
    keep: dict[str, list[int]]  # baseline channel indices of the current network, sorted
    model: nn.Module  # the current network's weights (slimmed to `keep`)
    temperature: float


def synthesize(gen: Generator, structure: Structure, cost: CostFn, level: float, tolerance: float, multiple: int,
               seed: int, noise: bool = True, allocation: str = "threshold") -> tuple[dict[str, list[int]], nn.Module]:
    """N_s = G(s): Gumbel-top-k on G's logits (a Plackett-Luce sample) cut to `level` by the shared budget fit
    (`fit_scores` by `allocation`: by default the knapsack under a latency budget, the global threshold otherwise).

    Returns the kept baseline channels per group and the network with weights inherited from G's network.
    """
    current = replace(structure, groups=widths_of(gen.keep))
    rng = torch.Generator().manual_seed(seed)
    scores = {}
    for g, idx in gen.keep.items():
        s = gen.logits[g][torch.tensor(idx, dtype=torch.long)].clone()
        if noise and gen.temperature > 0:
            u = torch.rand(len(idx), generator=rng).clamp_(1e-10, 1 - 1e-10)
            s += gen.temperature * -torch.log(-torch.log(u))
        scores[g] = s
    rel = fit_scores(current, scores, cost, level, tolerance, multiple, allocation=allocation)
    keep = {g: [gen.keep[g][i] for i in rel[g]] for g in rel}
    return keep, slim(gen.model, current, rel)


# ---- I: the inquisitor ---------------------------------------------------------------------------------------

@dataclass
class Inquisitor:
    """theta_I: the stimuli (fixed training batches), the perturbation, and how insights update G."""

    probes: list[tuple[torch.Tensor, torch.Tensor]]
    perturbation: str  # "taylor" | "ablation"
    step: float  # eta
    elite: float  # fraction of acceptable samples whose insights count


Writer = tuple[str, int, int]  # module name, first output channel of the group, output channels per group channel


def _writers(structure: Structure) -> dict[str, list[Writer]]:
    """Modules whose outputs carry each group's channels (and where): its BatchNorms, else its convs/linears."""
    out: dict[str, list[Writer]] = {}
    for g in structure.groups:
        found = [(la, pos, mult) for la in structure.layers if g in la.out_groups
                 for h, pos, _, mult in part_slices(la.out_parts, la.out_multiplier, structure.groups) if h == g]
        bns = [(la.name, pos, mult) for la, pos, mult in found if la.op == "batchnorm"]
        out[g] = bns or [(la.name, pos, mult) for la, pos, mult in found]
    return out


def _per_channel(t: torch.Tensor, pos: int, width: int, mult: int) -> torch.Tensor:
    """(batch, width): a writer's output summed over each group channel's features (and space)."""
    t = t[:, pos:pos + width * mult]
    return t.reshape(t.shape[0], width, -1).sum(2)


def contributions(inq: Inquisitor, model: nn.Module, structure: Structure) -> dict[str, torch.Tensor]:
    """I's reactions: per group, each present channel's contribution to the loss on the stimuli (>= 0).

    taylor: |sum over the channel's outputs (all of its group's writers) of a * dL/da| per example, averaged —
    the first-order loss change when the channel is removed (Molchanov et al. 2017). ablation: the measured loss
    increase when the channel is zeroed in all of its writers (clipped at 0).
    """
    mods = dict(model.named_modules())
    writers = {g: [w for w in ws if w[0] in mods] for g, ws in _writers(structure).items()
               if structure.groups[g]}  # a width-0 group's block (and a dropped block's BN) is gone
    gone = {g: torch.zeros(0) for g, w in structure.groups.items() if not w}
    device = next(model.parameters()).device
    was = model.training
    model.eval()  # stimuli must not move BN statistics
    try:
        if inq.perturbation == "taylor":
            return _taylor(model, mods, writers, structure.groups, inq.probes, device) | gone
        return _ablation(model, mods, writers, structure.groups, inq.probes) | gone
    finally:
        model.train(was)


def _taylor(model, mods, writers, widths, probes, device) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    seen = 0
    acts: dict[str, torch.Tensor] = {}
    names = sorted({n for ws in writers.values() for n, _, _ in ws})
    for x, y in probes:
        acts.clear()
        handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o)) for n in names]
        try:
            loss = F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
        finally:
            for h in handles:
                h.remove()
        grads = dict(zip(names, torch.autograd.grad(loss, [acts[n] for n in names])))
        for g, ws in writers.items():
            per_example = sum(_per_channel((acts[n] * grads[n]).detach(), pos, widths[g], mult) for n, pos, mult in ws)
            total[g] = total.get(g, 0) + per_example.abs().sum(0).cpu()
        seen += len(y)
    return {g: v / seen for g, v in total.items()}


@torch.no_grad()
def _ablation(model, mods, writers, widths, probes) -> dict[str, torch.Tensor]:
    base = probe_loss(model, probes)
    out = {}
    for g, ws in writers.items():
        deltas = torch.zeros(widths[g])
        for c in range(widths[g]):
            def zero(_m, _i, o, c=c, pos=0, mult=1):
                o = o.clone()
                o[:, pos + c * mult:pos + (c + 1) * mult] = 0
                return o

            handles = [mods[n].register_forward_hook(partial(zero, pos=pos, mult=mult)) for n, pos, mult in ws]
            try:
                deltas[c] = probe_loss(model, probes) - base
            finally:
                for h in handles:
                    h.remove()
        out[g] = deltas.clamp(min=0)
    return out


@torch.no_grad()
def probe_loss(model: nn.Module, probes: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy on the stimuli (eval mode): how much of the task a freshly cut network still does."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        total = sum(float(F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")) for x, y in probes)
    finally:
        model.train(was)
    return total / sum(len(y) for _, y in probes)


def insights(contrib: dict[str, torch.Tensor], keep: dict[str, list[int]], marginal: dict[str, float]) -> dict:
    """Per present channel (baseline index): log(contribution / marginal cost of its group), centred on the median.

    This is the quantity G's logits estimate; centring makes samples of different loss scales comparable.
    """
    positive = [m for m in marginal.values() if m > 0]
    floor = 1e-3 * (sum(positive) / len(positive)) if positive else 1.0
    mean_q = float(torch.cat([c.flatten() for c in contrib.values()]).mean())
    eps = 1e-6 * mean_q if mean_q > 0 else 1e-12
    values = {g: torch.log(contrib[g].double() + eps) - math.log(max(marginal[g], floor)) for g in keep}
    median = float(torch.cat(list(values.values())).median())
    return {g: {c: float(v) - median for c, v in zip(keep[g], values[g])} for g in keep}


def update(gen: Generator, elite: list[dict], step: float) -> dict[str, torch.Tensor]:
    """The insight-to-update rule: each channel's logit moves `step` of the way to its mean elite insight.

    A cross-entropy-method step: only the elite (best-U acceptable samples) count, and a channel no elite sample
    kept is left as it is (it was not observed). Returns the new logits; `gen` is not changed.
    """
    new = {g: v.clone() for g, v in gen.logits.items()}
    for g, logits in new.items():
        sums: dict[int, list[float]] = {}
        for ins in elite:
            for c, v in ins.get(g, {}).items():
                sums.setdefault(c, []).append(v)
        for c, vs in sums.items():
            logits[c] = (1 - step) * logits[c] + step * sum(vs) / len(vs)
    return new


def initial_generator(ctx: SearchContext, inq: Inquisitor, temperature: float,
                      marginal_step: int = OPTIONS["marginal_step"]) -> Generator:
    """G_0 from the prototype (the baseline): its weights, and logits from the inquisitor's insights on it."""
    keep = {g: list(range(w)) for g, w in ctx.structure.groups.items()}
    model = slim(ctx.baseline, ctx.structure, keep)
    marginal = _marginal(ctx, ctx.structure.groups, marginal_step)
    ins = insights(contributions(inq, model, ctx.structure), keep, marginal)
    logits = {g: torch.tensor([ins[g][c] for c in range(w)], dtype=torch.float64)
              for g, w in ctx.structure.groups.items()}
    return Generator(logits, keep, model, temperature)


# ---- the cycles ------------------------------------------------------------------------------------------------

def schedule(baseline_cost: float, target: float, cycles: int) -> list[float]:
    """The cost each cycle synthesizes at: geometric steps from the baseline's cost, the last one the budget."""
    return [baseline_cost * (target / baseline_cost) ** ((k + 1) / cycles) for k in range(cycles)]


def _marginal(ctx: SearchContext, widths: dict[str, int], step: int = OPTIONS["marginal_step"]) -> dict[str, float]:
    """Each group's cost per channel, measured over `step` channels (at least the multiple, at most all but one).

    FLOPs and parameters are linear in one group's width, so the step does not change them. A latency table is a
    step function of width (kernels change at vector multiples, per-layer overhead does not shrink): measured over
    one channel most groups look free or very dear, and the knapsack then empties the dear ones. At a 0.5x host
    latency budget that ended at 21.6 % top-1 with step 1 and 79.3 % with step 16 (docs/gensynth.md).
    """
    return marginal_costs(ctx.cost, ctx.structure, widths, step=max(1, ctx.channel_multiple, step))


def _at(structure: Structure, keep: dict[str, list[int]]) -> Structure:
    return replace(structure, groups=widths_of(keep))


def assess(ctx: SearchContext, keep: dict[str, list[int]], model: nn.Module, req: Requirement, kind: str,
           calib: torch.Tensor | None) -> dict:
    """Measure one network: cost, FLOPs, params, ms, val top-1 (fp32 and at the deployment precision), U, 1_r."""
    widths = widths_of(keep)
    top1_fp32 = evaluate(model, ctx.data.val)
    top1 = top1_fp32 if ctx.precision == "fp32" else evaluate_at_precision(model, ctx.data.val, ctx.precision, calib)
    rec = {"widths": widths, "cost": ctx.cost(widths), "level": req.level, "flops": ctx.flops(widths),
           "params": int(ctx.params(widths)), "ms": None if ctx.latency is None else ctx.latency(widths),
           "top1_fp32": round(top1_fp32, 3), "top1": round(top1, 3), "precision": ctx.precision}
    rec["utility"] = round(utility(rec, kind), 4)
    rec["violations"] = indicator(rec, req, ctx.structure)
    rec["feasible"] = not rec["violations"]
    return rec


def select(records: list[dict], elite: float, by: str = "utility", *,
           stand_in: bool = False) -> tuple[int, list[int], bool]:
    """(best, elite indices, whether 1_r held for any): best U (by="utility") or lowest loss on the stimuli
    (by="probe_loss", for samples not yet fine-tuned) among acceptable samples.

    When no sample meets every requirement, the ones meeting the hard ones (budget, multiple) stand in and the
    cycle is recorded as missing the accuracy requirement. None meeting the hard ones is a BudgetError, unless
    `stand_in` (the level is not the end, or a measured loop will judge and re-fit the result): then the samples in
    the multiple that land below the level (under a cap), else the one closest to it, stand in.
    """
    pool = [i for i, r in enumerate(records) if r["feasible"]]
    met = bool(pool)
    if not pool:
        pool = [i for i, r in enumerate(records) if not set(HARD) & set(r["violations"])]
    if not pool and stand_in:
        pool = near_misses(records)
    if not pool:
        r = records[0]
        raise BudgetError(f"gensynth: no synthesized network lands within the tolerance of {r['level']:.4g} "
                          f"(closest {min(x['cost'] for x in records):.4g}) with widths in multiples of the channel "
                          "multiple")
    ranked = sorted(pool, key=lambda i: -records[i]["utility"] if by == "utility" else records[i]["probe_loss"])
    return ranked[0], ranked[:max(1, math.ceil(elite * len(ranked)))], met


def near_misses(records: list[dict]) -> list[int]:
    """Samples in the channel multiple that miss only the budget's tolerance: those below the level, else the
    closest to it (the knapsack in coarse steps can jump over a narrow band)."""
    ok = [i for i, r in enumerate(records) if "multiple" not in r["violations"]]
    below = [i for i in ok if records[i]["cost"] <= records[i]["level"]]
    if below or not ok:
        return below
    return [min(ok, key=lambda i: abs(records[i]["cost"] - records[i]["level"]))]


def stimuli(ctx: SearchContext, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """I's stimuli: `count` fixed training batches (the same for every network, so reactions compare)."""
    x, y = ctx.data.train.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(ctx.seed + 911))
    b = ctx.finetune.batch_size
    return [(x[idx], y[idx]) for idx in (order[i * b:(i + 1) * b] for i in range(count)) if len(idx)]


def _steps(ctx: SearchContext, opts: dict) -> int:
    if opts["steps"]:
        return opts["steps"]
    per_epoch = max(1, len(ctx.data.train.tensors[1]) // ctx.finetune.batch_size)
    trained = opts["cycles"] * (opts["samples"] if opts["train"] == "all" else 1)
    return max(1, round(ctx.search_epochs * per_epoch / trained))


def _finetune(ctx: SearchContext, model: nn.Module, steps: int, seed: int, desc: str, mimic: float = 0.0) -> None:
    """`steps` SGD steps of the fine-tune schedule on a seeded subset; with `mimic` > 0 the loss also matches the
    prototype's soft outputs (distillation weight `mimic`, the run's temperature)."""
    x, y = ctx.data.train.tensors
    n = min(len(y), steps * ctx.finetune.batch_size)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    cfg = replace(ctx.finetune, epochs=1, seed=seed, progress=False, distill_alpha=mimic)
    train(model, TensorDataset(x[idx], y[idx]), cfg, desc=desc, teacher=ctx.baseline if mimic > 0 else None)


def _config(ctx: SearchContext, opts: dict) -> dict:
    """What a resumed search must share with the one that wrote the state (`strict` only judges the end)."""
    return {**{k: v for k, v in opts.items() if k != "strict"}, "budget": ctx.budget.to_dict(),
            "target_cost": ctx.target_cost, "seed": ctx.seed, "channel_multiple": ctx.channel_multiple,
            "precision": ctx.precision, "groups": ctx.structure.groups}


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _save(ctx: SearchContext, config: dict, history: list[dict], gen: Generator) -> None:
    """After each cycle: history (JSON, for people) and G's state (for resuming at the next cycle)."""
    if ctx.run_dir is None:
        return
    save_atomic({"cycles_done": len(history), "logits": gen.logits, "keep": gen.keep,
                 "model": gen.model.state_dict()}, ctx.state_path("gensynth.pt"))
    _write_json(ctx.state_path("gensynth.json"), {"config": config, "cycles": history})


def _resume(ctx: SearchContext, config: dict, temperature: float) -> tuple[list[dict], Generator] | None:
    if ctx.run_dir is None or not ctx.state_path("gensynth.pt").is_file():
        return None
    path = ctx.state_path("gensynth.json")
    try:
        saved = json.loads(path.read_text())
        history = saved["cycles"]
        old = saved["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: missing or unreadable; delete {path.parent} to restart the search") from None
    changed = [k for k in config if json.loads(json.dumps(config[k])) != old.get(k)]
    if changed:
        raise ConfigError(f"{path}: written with a different {changed[0]} ({old.get(changed[0])!r}); use a new run "
                          "directory")
    state = load_checkpoint(ctx.state_path("gensynth.pt"))
    if state["cycles_done"] != len(history):
        raise ConfigError(f"{path}: does not match gensynth.pt next to it; delete {path.parent} to restart")
    keep = {g: [int(i) for i in v] for g, v in state["keep"].items()}
    model = slim(ctx.baseline, ctx.structure, keep)
    model.load_state_dict(state["model"])
    return history, Generator(dict(state["logits"]), keep, model, temperature)


def cycle(ctx: SearchContext, gen: Generator, inq: Inquisitor, req: Requirement, opts: dict, steps: int, k: int,
          calib: torch.Tensor | None) -> tuple[Generator, dict]:
    """One generator-inquisitor cycle at `req.level`: (the updated G, the cycle's history entry).

    Every sample is synthesized, its BatchNorm statistics re-estimated on the stimuli, and assessed (U, 1_r, and
    its loss on the stimuli). train="all": each sample is first fine-tuned for `steps`, and the best U wins.
    train="best" (the default): the best U (screen="utility") or the lowest loss on the stimuli (screen="loss")
    among the untrained samples wins, is fine-tuned with the whole cycle's steps and assessed again; 1_r of the
    cycle is then that of the trained network. The elite's insights (the trained network's in place of its
    untrained self) update G.
    """
    records, nets = [], []
    for s in range(opts["samples"]):
        seed = ctx.seed * 1_000_003 + k * 1009 + s
        keep, model = synthesize(gen, ctx.structure, ctx.cost, req.level, ctx.budget.tolerance,
                                 ctx.channel_multiple, seed, noise=s > 0, allocation=ctx.budget.rule)
        if opts["train"] == "all":
            _finetune(ctx, model, steps, ctx.seed * 1009 + k, f"gensynth cycle {k + 1} sample {s + 1}",
                      opts["mimic"])
        recalibrate_bn(model, inq.probes)
        rec = assess(ctx, keep, model, req, opts["utility"], calib)
        rec.update(cycle=k + 1, sample=s, seed=seed, probe_loss=round(probe_loss(model, inq.probes), 5))
        records.append(rec)
        nets.append((keep, model))
    by = "probe_loss" if opts["train"] == "best" and opts["screen"] == "loss" else "utility"
    last = k == opts["cycles"] - 1
    best, elite, met = select(records, inq.elite, by, stand_in=not last or measures(ctx))
    entry = {"cycle": k + 1, "level": req.level, "best": best, "elite": elite, "requirements_met": met,
             "samples": records}
    if "budget" in records[best]["violations"]:
        entry["stand_in"] = "no sample within the tolerance: " + (
            "the next cycle compacts further" if not last else "the measured loop judges and re-fits")
    keep, model = nets[best]
    if opts["train"] == "best":
        _finetune(ctx, model, steps, ctx.seed * 1009 + k, f"gensynth cycle {k + 1} best sample", opts["mimic"])
        trained = assess(ctx, keep, model, req, opts["utility"], calib)
        trained.update(cycle=k + 1, sample=best, seed=records[best]["seed"])
        entry.update(trained=trained, requirements_met=trained["feasible"])
    found = []
    for i in [best, *(i for i in elite if i != best)]:
        kept, net = nets[i]
        found.append(insights(contributions(inq, net, _at(ctx.structure, kept)), kept,
                              _marginal(ctx, widths_of(kept), opts["marginal_step"])))
    return Generator(update(gen, found, inq.step), keep, model, gen.temperature), entry


def _finish(ctx: SearchContext, gen: Generator, history: list[dict], req: Requirement, opts: dict,
            calib: torch.Tensor | None) -> Proposal:
    """Final fine-tune of G's last network (the common schedule), then 1_r once more on the trained network."""
    final_finetune(ctx, gen.model, ctx.state_path("gensynth-final.pt"), "gensynth final fine-tune")
    gen.model.eval()
    final = assess(ctx, gen.keep, gen.model, req, opts["utility"], calib)
    relaxed = [v for v in final["violations"] if v not in HARD]
    entry = {"final": final, "relaxed": relaxed}
    if relaxed:
        msg = (f"no network meets the accuracy requirement at {ctx.precision}: best {final['top1']:.2f}% val top-1 vs "
               f"required {req.min_top1:.2f}% (baseline - {opts['accuracy_tolerance']:g})")
        if opts["strict"]:
            raise BudgetError(f"gensynth: {msg}; raise --set accuracy_tolerance or the budget")
        ctx.log(f"gensynth: WARNING: {msg}; returning the best network within the budget (accuracy relaxed)")
    if ctx.run_dir is not None:
        _write_json(ctx.state_path("gensynth.json"), {"config": _config(ctx, opts), "cycles": history, **entry})
    return Proposal(keep=gen.keep, source=ctx.baseline, history=[*history, entry], finetuned=True,
                    compact=gen.model, scores=channel_scores(gen))


def channel_scores(gen: Generator) -> dict[str, torch.Tensor]:
    """G's logits as channel scores: the channels its cycles removed rank below every one it kept, so a re-fit
    (to a measured latency) compacts G's network further, or takes removed channels back last."""
    values = torch.cat(list(gen.logits.values()))
    span = float(values.max() - values.min()) + 1.0
    out = {}
    for g, v in gen.logits.items():
        idx = torch.tensor(gen.keep[g], dtype=torch.long)
        s = v.float() - span
        s[idx] = v[idx].float()
        out[g] = s
    return out


@register_method("gensynth")
def gensynth(ctx: SearchContext) -> Proposal:
    """Cycles of synthesize -> short fine-tune -> assess (U, 1_r) -> inquire -> update G; then a final fine-tune."""
    opts = options(ctx)
    config = _config(ctx, opts)
    levels = schedule(ctx.baseline_cost, ctx.target_cost, opts["cycles"])
    base_val = evaluate(ctx.baseline, ctx.data.val)
    req = Requirement(levels[-1], ctx.budget.tolerance, ctx.channel_multiple, base_val - opts["accuracy_tolerance"],
                      ctx.precision)
    calib = calibration_inputs(ctx.data.train, opts["calib"]) if ctx.precision == "int8" else None
    inq = Inquisitor(stimuli(ctx, opts["probe_batches"]), opts["probe"], opts["step"], opts["elite"])
    steps = _steps(ctx, opts)
    resumed = _resume(ctx, config, opts["temperature"])
    if resumed is None:
        history, gen = [], initial_generator(ctx, inq, opts["temperature"], opts["marginal_step"])
    else:
        history, gen = resumed
        ctx.log(f"gensynth: resuming after cycle {len(history)}/{opts['cycles']}")
    for k in range(len(history), opts["cycles"]):
        ctx.log(f"gensynth: cycle {k + 1}/{opts['cycles']}: {opts['samples']} samples at cost {levels[k]:.4g} "
                f"({levels[k] / ctx.baseline_cost:.3f}x), {steps} fine-tune steps for "
                f"{'each' if opts['train'] == 'all' else 'the best'}")
        gen, entry = cycle(ctx, gen, inq, replace(req, level=levels[k]), opts, steps, k, calib)
        history.append(entry)
        r = entry.get("trained") or entry["samples"][entry["best"]]
        trained = "" if "trained" not in entry else \
            f", after fine-tuning the best: {'meets' if r['feasible'] else 'misses'} 1_r"
        ctx.log(f"gensynth: cycle {k + 1}: best U {r['utility']:.2f}, top-1 {r['top1']:.2f}% ({ctx.precision}), "
                f"{sum(x['feasible'] for x in entry['samples'])}/{len(entry['samples'])} samples meet 1_r{trained}")
        if "stand_in" in entry:
            ctx.log(f"gensynth: cycle {k + 1}: cost {r['cost']:.4g} vs level {levels[k]:.4g} "
                    f"({100 * (r['cost'] / levels[k] - 1):+.1f}%); {entry['stand_in']}")
        _save(ctx, config, history, gen)
    return _finish(ctx, gen, history, req, opts, calib)
