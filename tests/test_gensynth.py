"""Generative Synthesis: U, the indicator 1_r, the generator, the inquisitor, the cycles, and resuming them."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from scipy.stats import spearmanr

from edgecompact.budget import parse_budget, within
from edgecompact.errors import BudgetError, ConfigError
from edgecompact.latency_loop import close_loop, measures
from edgecompact.methods import gensynth as gs
from edgecompact.methods.base import run_method
from edgecompact.precision import calibration_inputs, evaluate_at_precision
from edgecompact.structure import check_widths, slim, widths_of
from edgecompact.train import TrainConfig, evaluate

# The end-to-end configuration (small enough for digits16 on a shared CPU). Its 2 cycles of 3 steps and one
# fine-tune epoch land between 86 and 95 % int8 val top-1 (baseline 97.9) depending on which samples win, so the
# accuracy requirement is set where it is always achievable; the unmet case has its own test below.
SMALL = {"cycles": 2, "samples": 2, "steps": 3, "probe_batches": 2, "accuracy_tolerance": 15.0}


def _context(digits16, trained_resnet20, run_dir=None, log=lambda *_: None, **kw):
    from edgecompact.pipeline import build_context

    kw.setdefault("options", dict(SMALL))
    return build_context(copy.deepcopy(trained_resnet20), digits16, "0.33x", model_name="resnet20",
                         finetune=TrainConfig(epochs=1, lr=0.02, batch_size=64, progress=False), search_epochs=1,
                         channel_multiple=8, precision="int8", run_dir=run_dir, log=log, **kw)


@pytest.fixture(scope="module")
def searched(digits16, trained_resnet20, tmp_path_factory):
    """One uninterrupted search at 1/3 FLOPs, int8, channel multiple 8: (context, result)."""
    ctx = _context(digits16, trained_resnet20, run_dir=tmp_path_factory.mktemp("gensynth"))
    return ctx, run_method("gensynth", ctx)


def test_netscore_matches_hand_computed_values():
    assert gs.netscore(100, 1, 1) == pytest.approx(80.0)  # 20 log10(100^2)
    assert gs.netscore(10, 100, 0.01) == pytest.approx(40.0)  # 20 log10(100 / (10 * 0.1))
    assert gs.netscore(50, 4, 0.25) == pytest.approx(20 * math.log10(2500))  # 67.96
    assert gs.netscore(50, 4, 0.25) > gs.netscore(49, 4, 0.25) > gs.netscore(49, 5, 0.25)


def test_utility_takes_macs_in_billions_or_the_targets_predicted_ms():
    record = {"top1": 50.0, "params": 4e6, "flops": 0.5e9, "ms": 0.25}  # 0.25 G MACs, 0.25 ms
    assert gs.utility(record, "netscore") == pytest.approx(20 * math.log10(2500))
    assert gs.utility(dict(record, ms=1.0), "netscore-latency") == pytest.approx(20 * math.log10(1250))
    assert gs.utility(dict(record, params=1e9), "top1") == 50.0  # accuracy alone: cost is the budget's business


def test_indicator_rejects_each_kind_of_violation(make_context):
    ctx = make_context(channel_multiple=8, precision="int8")
    req = gs.Requirement(level=ctx.target_cost, tolerance=0.02, channel_multiple=8, min_top1=90.0, precision="int8")
    widths = {g: w // 2 for g, w in ctx.structure.groups.items()}  # 8, 16, 32: multiples of 8
    ok = {"widths": widths, "cost": ctx.target_cost, "top1_fp32": 95.0, "top1": 94.0, "precision": "int8"}
    assert gs.indicator(ok, req, ctx.structure) == []
    bad_widths = dict(widths, **{next(iter(widths)): 12})
    cases = {
        "budget": dict(ok, cost=ctx.target_cost * 1.05),
        "multiple": dict(ok, widths=bad_widths),
        "accuracy": dict(ok, top1_fp32=85.0, top1=84.0),
        "precision": dict(ok, top1=85.0),  # fp32 meets it, the int8 network does not
    }
    for kind, record in cases.items():
        assert gs.indicator(record, req, ctx.structure) == [kind]
    assert gs.indicator(dict(ok, precision="fp32"), req, ctx.structure) == ["precision"]  # not measured at int8


def test_indicator_sees_the_accuracy_int8_deployment_loses(make_context, digits16):
    ctx = make_context(channel_multiple=8, precision="int8")
    keep = {g: list(range(w)) for g, w in ctx.structure.groups.items()}
    base_val = evaluate(ctx.baseline, digits16.val)
    req = gs.Requirement(ctx.baseline_cost, 0.02, 8, base_val - 2.0, "int8")
    calib = calibration_inputs(digits16.train)
    assert gs.assess(ctx, keep, ctx.baseline, req, "netscore", calib)["violations"] == []
    bad = gs.assess(ctx, keep, ctx.baseline, req, "netscore", calib * 200)  # ranges 200x too wide
    assert bad["top1_fp32"] == pytest.approx(base_val, abs=0.01)
    assert bad["violations"] == ["precision"] and not bad["feasible"]


def test_synthesized_networks_meet_the_level_in_multiples_and_inherit_weights(make_context):
    ctx = make_context(channel_multiple=8)
    gen = gs.initial_generator(ctx, gs.Inquisitor(gs.stimuli(ctx, 1), "taylor", 0.5, 0.5), temperature=1.0)
    level = 0.5 * ctx.baseline_cost
    x = ctx.data.val.tensors[0][:32]
    samples = [gs.synthesize(gen, ctx.structure, ctx.cost, level, 0.02, 8, seed) for seed in range(4)]
    for keep, net in samples:
        assert within(ctx.cost(widths_of(keep)), level, 0.02)
        check_widths(ctx.structure, widths_of(keep), 8)
        with torch.no_grad():  # the synthesized network is the baseline's channels `keep`, weights and all
            assert torch.allclose(net.eval()(x), slim(ctx.baseline, ctx.structure, keep).eval()(x), atol=1e-5)
    assert any(keep != samples[0][0] for keep, _ in samples[1:])  # G is stochastic in its seed
    mode, _ = gs.synthesize(gen, ctx.structure, ctx.cost, level, 0.02, 8, seed=0, noise=False)
    assert mode == gs.synthesize(gen, ctx.structure, ctx.cost, level, 0.02, 8, seed=1, noise=False)[0]
    # the next generation is synthesized from this one: nested channels, weights inherited through both steps
    child = gs.Generator(gen.logits, samples[1][0], samples[1][1], 1.0)
    keep2, net2 = gs.synthesize(child, ctx.structure, ctx.cost, 0.35 * ctx.baseline_cost, 0.02, 8, seed=7)
    assert all(set(keep2[g]) <= set(samples[1][0][g]) for g in keep2)
    with torch.no_grad():
        assert torch.allclose(net2.eval()(x), slim(ctx.baseline, ctx.structure, keep2).eval()(x), atol=1e-5)


def test_select_ranks_by_utility_or_by_the_loss_on_the_stimuli():
    ok = {"violations": [], "feasible": True}
    recs = [dict(ok, utility=90.0, probe_loss=0.5), dict(ok, utility=95.0, probe_loss=2.3),
            {"violations": ["budget"], "feasible": False, "utility": 99.0, "probe_loss": 0.1},
            dict(ok, utility=80.0, probe_loss=0.7)]
    assert gs.select(recs, 0.5) == (1, [1, 0], True)
    assert gs.select(recs, 0.5, by="probe_loss") == (0, [0, 3], True)  # the budget-breaker never counts


def test_when_no_sample_lands_in_the_tolerance_the_near_misses_stand_in_only_where_allowed():
    def rec(cost, utility, *violations):
        return {"cost": cost, "level": 0.30, "utility": utility, "probe_loss": 1.0,
                "violations": list(violations), "feasible": not violations}

    # steps of 16 jump over the +-5% band: two samples land under the level, one over, one breaks the multiple
    recs = [rec(0.279, 101.0, "budget"), rec(0.282, 99.0, "budget", "accuracy"), rec(0.33, 120.0, "budget"),
            rec(0.30, 130.0, "multiple")]
    with pytest.raises(BudgetError, match=r"tolerance of 0\.3 \(closest 0\.279\)"):
        gs.select(recs, 0.5)  # the end of a FLOP budget: nothing may be returned outside it
    assert gs.select(recs, 0.5, stand_in=True) == (0, [0], False)  # under the cap, best U; never the one over
    # none under the level: the closest one alone
    over = [rec(0.33, 120.0, "budget"), rec(0.32, 90.0, "budget"), rec(0.29, 200.0, "multiple", "budget")]
    assert gs.select(over, 1.0, stand_in=True) == (1, [1], False)
    assert gs.near_misses([rec(0.3, 1.0, "multiple")]) == []


def test_only_a_measured_latency_budget_lets_the_last_cycle_miss_its_tolerance(make_context):
    ctx = make_context(channel_multiple=8)
    assert not measures(ctx)  # a FLOP budget: the last cycle's network is the delivered one
    lat = replace(ctx, budget=replace(ctx.budget, metric="latency"), measure_latency=lambda keep: (1.0, 0.5))
    assert measures(lat)
    assert not measures(replace(lat, measure_rounds=0))  # predicted only: nothing re-fits it
    assert not measures(replace(lat, measure_latency=None))
    # the loop itself agrees: it times exactly where GenSynth lets its last cycle hand it a near miss
    keep = {g: list(range(w)) for g, w in ctx.structure.groups.items()}
    assert close_loop(lat, keep, None)[1]["measured"]
    assert close_loop(replace(lat, measure_rounds=0), keep, None)[1]["measured"] is False


def test_update_moves_each_logit_toward_what_the_insights_say():
    gen = gs.Generator({"a": torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=torch.float64)}, {"a": [0, 1, 2, 3]},
                       torch.nn.Linear(1, 1), 0.5)
    elite = [{"a": {0: 2.0, 1: 1.0, 2: -2.0}}, {"a": {0: 4.0, 2: 0.0}}]  # channel 3 was never observed
    new = gs.update(gen, elite, step=0.5)["a"]
    assert new.tolist() == pytest.approx([1.5, 1.0, 0.5, -1.0])  # halfway to the mean insight: 3, 1, -1
    assert gen.logits["a"].tolist() == [0.0, 1.0, 2.0, -1.0]  # G itself is replaced, not mutated


def test_a_cycle_raises_the_logits_of_channels_measured_to_contribute_more(make_context):
    ctx = make_context(channel_multiple=8)
    inq = gs.Inquisitor(gs.stimuli(ctx, 2), "taylor", 0.5, 1.0)
    gen = gs.initial_generator(ctx, inq, temperature=0.5)
    keep, net = gs.synthesize(gen, ctx.structure, ctx.cost, 0.6 * ctx.baseline_cost, 0.02, 8, seed=3)
    gs._finetune(ctx, net, steps=3, seed=0, desc="test")
    contrib = gs.contributions(inq, net, gs._at(ctx.structure, keep))
    ins = gs.insights(contrib, keep, gs._marginal(ctx, widths_of(keep)))
    new = gs.update(gen, [ins], inq.step)
    for g, channels in keep.items():
        old, now = gen.logits[g][channels], new[g][channels]
        told = torch.tensor([ins[g][c] for c in channels], dtype=torch.float64)
        assert ((now - old) * (told - old) >= 0).all()  # every logit moved toward its insight
        assert ((now - told).abs() <= (old - told).abs() + 1e-12).all()
        # within a group (one marginal cost), the insights' share of the new logit ranks channels by contribution
        assert spearmanr(contrib[g], now - (1 - inq.step) * old).statistic > 0.99


def test_taylor_insights_predict_the_damage_of_removing_each_channel(make_context):
    ctx = make_context(finetune=TrainConfig(batch_size=64, progress=False))
    probe = gs.stimuli(ctx, 1)
    names = list(ctx.structure.groups)
    some = replace(ctx.structure, groups={g: ctx.structure.groups[g] for g in names[:2] + names[-3:]})
    taylor = gs.contributions(gs.Inquisitor(probe, "taylor", 0.5, 0.5), ctx.baseline, some)
    ablation = gs.contributions(gs.Inquisitor(probe, "ablation", 0.5, 0.5), ctx.baseline, some)
    t = torch.cat([taylor[g] for g in some.groups])
    a = torch.cat([ablation[g] for g in some.groups])
    assert spearmanr(t, a).statistic > 0.5


@pytest.mark.slow
def test_returned_network_meets_every_constraint(searched, digits16):
    ctx, result = searched
    widths = result.arch.widths
    check_widths(ctx.structure, widths, 8)
    assert all(w % 8 == 0 for w in widths.values())
    assert within(ctx.cost(widths), ctx.target_cost, ctx.budget.tolerance)
    assert result.history[-1] == {"final": "inherit", "val_top1": result.metrics["final_val_top1"]}  # run_method's
    final = result.history[-2]  # GenSynth's own last entry: the verdict on its fine-tuned network
    assert final["relaxed"] == [] and final["final"]["feasible"]
    calib = calibration_inputs(digits16.train)
    top1 = evaluate_at_precision(result.model, digits16.val, "int8", calib)  # measured again, independently
    assert top1 == pytest.approx(final["final"]["top1"], abs=0.01)
    assert top1 >= evaluate(ctx.baseline, digits16.val) - SMALL["accuracy_tolerance"]
    for cycle in result.history[:-2]:  # each cycle kept the best sample of those 1_r accepts
        samples = cycle["samples"]
        pool = [r for r in samples if r["feasible"]] or [r for r in samples if not {"budget", "multiple"} &
                                                          set(r["violations"])]
        assert samples[cycle["best"]]["utility"] == max(r["utility"] for r in pool)
        trained = cycle["trained"]  # train="best": the cycle's verdict is the fine-tuned best sample's
        assert trained["widths"] == samples[cycle["best"]]["widths"]
        assert cycle["requirements_met"] == trained["feasible"] == (trained["violations"] == [])
    saved = json.loads((ctx.run_dir / "search" / "gensynth.json").read_text())
    assert len(saved["cycles"]) == SMALL["cycles"] and saved["final"]["widths"] == widths


@pytest.mark.slow
def test_unmet_accuracy_is_recorded_or_raised_when_strict(digits16, trained_resnet20, tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "evaluate_at_precision", lambda *a, **k: 0.0)  # int8 deployment that always fails
    opts = dict(SMALL, cycles=1, samples=1, steps=1)
    with pytest.raises(BudgetError, match="accuracy requirement at int8"):
        run_method("gensynth", _context(digits16, trained_resnet20, tmp_path, options=dict(opts, strict=True)))
    logs: list[str] = []
    result = run_method("gensynth", _context(digits16, trained_resnet20, tmp_path, log=logs.append,
                                             options=opts))  # resumes: same search, only the verdict differs
    final = result.history[-2]
    assert final["final"]["top1"] == 0.0 and final["relaxed"] and set(final["relaxed"]) <= {"accuracy", "precision"}
    assert any("resuming after cycle 1/1" in m for m in logs) and any("WARNING" in m for m in logs)
    assert all(w % 8 == 0 for w in result.arch.widths.values())  # the hard constraints still hold


@pytest.mark.parametrize("mode,screen", [("best", "utility"), ("best", "loss"), ("all", "loss")])
def test_a_cycle_fine_tunes_only_what_its_mode_says_and_carries_the_best_forward(make_context, monkeypatch, mode,
                                                                                  screen):
    ctx = make_context(channel_multiple=8, options=dict(SMALL, train=mode, samples=3, screen=screen))
    opts = gs.options(ctx)
    inq = gs.Inquisitor(gs.stimuli(ctx, 2), "taylor", 0.5, 1.0)
    gen = gs.initial_generator(ctx, inq, temperature=0.5)
    tuned: list[int] = []
    real = gs._finetune
    monkeypatch.setattr(gs, "_finetune", lambda c, model, *a: (tuned.append(id(model)), real(c, model, *a)))
    req = gs.Requirement(0.6 * ctx.baseline_cost, 0.02, 8, 0.0, "fp32")
    new, entry = gs.cycle(ctx, gen, inq, req, opts, steps=2, k=0, calib=None)
    assert len(tuned) == (1 if mode == "best" else 3)
    assert tuned[-1 if mode == "best" else entry["best"]] == id(new.model)
    assert widths_of(new.keep) == entry["samples"][entry["best"]]["widths"]
    assert ("trained" in entry) == (mode == "best")
    key = "probe_loss" if (mode, screen) == ("best", "loss") else "utility"  # train=all always ranks by U
    sign = 1 if key == "probe_loss" else -1
    assert entry["best"] == min(range(3), key=lambda i: sign * entry["samples"][i][key])
    record = entry.get("trained") or entry["samples"][entry["best"]]
    assert evaluate(new.model, ctx.data.val) == pytest.approx(record["top1"], abs=1e-3)  # G holds what was judged


def test_cycle_fine_tunes_imitate_the_prototype_by_mimic_not_by_the_runs_distillation(make_context, monkeypatch):
    ctx = make_context()  # the run itself does not distil (finetune.distill_alpha == 0)
    seen = []
    monkeypatch.setattr(gs, "train", lambda model, data, cfg, teacher=None, **kw: seen.append((cfg.distill_alpha,
                                                                                              teacher)))
    net = copy.deepcopy(ctx.baseline)
    gs._finetune(ctx, net, steps=2, seed=0, desc="t", mimic=0.5)
    gs._finetune(ctx, net, steps=2, seed=0, desc="t", mimic=0.0)
    assert seen[0] == (0.5, ctx.baseline) and seen[1] == (0.0, None)


def test_cycles_distil_exactly_when_the_run_does(make_context):
    """The same teacher for every method or none: `mimic` defaults to the run's --distill weight."""
    from edgecompact.train import TrainConfig

    assert gs.options(make_context())["mimic"] == 0.0
    distilled = TrainConfig(epochs=1, lr=0.02, batch_size=64, progress=False, distill_alpha=0.5)
    assert gs.options(make_context(finetune=distilled))["mimic"] == 0.5
    assert gs.options(make_context(options={"mimic": "0.25"}))["mimic"] == 0.25


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_interruption_skips_finished_cycles(searched, digits16, trained_resnet20, tmp_path):
    def kill_at_cycle_2(msg: str) -> None:
        if msg.startswith("gensynth: cycle 2/2"):
            raise _Killed

    with pytest.raises(_Killed):
        run_method("gensynth", _context(digits16, trained_resnet20, tmp_path, log=kill_at_cycle_2))
    first = json.loads((tmp_path / "search" / "gensynth.json").read_text())["cycles"]
    assert len(first) == 1
    logs: list[str] = []
    resumed = run_method("gensynth", _context(digits16, trained_resnet20, tmp_path, log=logs.append))
    assert not any(m.startswith("gensynth: cycle 1/2") for m in logs)
    assert any(m.startswith("gensynth: cycle 2/2") for m in logs)
    assert resumed.history[0] == first[0]
    _, uninterrupted = searched
    assert resumed.arch.keep == uninterrupted.arch.keep
    assert resumed.metrics["top1"] == uninterrupted.metrics["top1"]
    with pytest.raises(ConfigError, match="different cycles"):
        run_method("gensynth", _context(digits16, trained_resnet20, tmp_path, options=dict(SMALL, cycles=3)))


def test_options_are_typed_and_checked(make_context):
    ctx = make_context(options={"cycles": "3", "strict": "true", "utility": "netscore"})
    opts = gs.options(ctx)
    assert opts["cycles"] == 3 and opts["strict"] is True
    for bad, match in [({"cycle": 3}, "--set cycle"), ({"cycles": "many"}, "--set cycles=many"),
                       ({"step": 0}, "--set step"), ({"probe": "gradient"}, "probe=gradient"),
                       ({"mimic": 2}, "--set mimic=2.0: out of range"), ({"marginal_step": 0}, "marginal_step=0"),
                       ({"screen": "vibes"}, "screen=vibes: out of range"),
                       ({"train": "some"}, r"train=some: out of range \(choose best, all\)"),
                       ({"utility": "netscore-latency"}, "needs --target")]:
        with pytest.raises(ConfigError, match=match):
            gs.options(make_context(options=bad))


def test_marginal_step_leaves_flop_and_param_marginals_alone(make_context):
    # FLOPs and parameters are linear in one group's width: the per-channel marginal is the same over any step
    for metric in ("flops", "params"):
        ctx = make_context(budget=parse_budget("0.33x", metric))
        widths = {g: max(2, int(0.7 * w)) for g, w in ctx.structure.groups.items()}
        one, coarse = gs._marginal(ctx, widths, 1), gs._marginal(ctx, widths, 16)
        assert all(coarse[g] == pytest.approx(one[g], rel=1e-9) for g in widths)
        # and they are the cost removed by taking one channel away, measured directly
        g = next(iter(widths))
        assert one[g] == pytest.approx(ctx.cost(widths) - ctx.cost(dict(widths, **{g: widths[g] - 1})))


def test_compaction_schedule_is_geometric_and_ends_at_the_budget():
    levels = gs.schedule(100.0, 12.5, 3)
    assert levels == pytest.approx([50.0, 25.0, 12.5])
