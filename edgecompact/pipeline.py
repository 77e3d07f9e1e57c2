"""Wiring of the stages for one search: baseline, structure, cost models, budget, SearchContext.

The CLI, the benchmark scripts and the tests build their SearchContext here, so that every caller measures cost and
budgets the same way. Stages stay plain functions on plain data; this file only connects them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from edgecompact.budget import Budget, check_budget, min_widths, parse_budget
from edgecompact.cost.flops import arch_flops, arch_params
from edgecompact.cost.model import LatencyModel, latency_model
from edgecompact.data import DataSplits
from edgecompact.errors import ConfigError
from edgecompact.latency_loop import MEASURE_ROUNDS, measurer_for
from edgecompact.methods.base import SearchContext
from edgecompact.storage import read_json, write_atomic, write_text_atomic
from edgecompact.structure import Structure, analyze
from edgecompact.train import TrainConfig, evaluate, load_checkpoint, save_atomic, train


def build_context(baseline: nn.Module, data: DataSplits, budget: Budget | str, *, model_name: str = "model",
                  finetune: TrainConfig | None = None, search_epochs: int = 4, channel_multiple: int = 1,
                  scratch: TrainConfig | None = None, final: str = "inherit",
                  drop_blocks: bool = False, precision: str = "fp32", target=None, profile: Path | None = None,
                  run_dir: Path | None = None,
                  seed: int = 0, options: dict | None = None, structure: Structure | None = None,
                  baseline_top1: float | None = None, measure_rounds: int = MEASURE_ROUNDS,
                  latency: LatencyModel | None = None, rpc: tuple[str, int, str] | None = None,
                  log=print) -> SearchContext:
    """A SearchContext for `baseline` (already trained) on `data` under `budget` (a Budget or text like '1/3x').

    `scratch` is the schedule of a from-scratch training (the protocol's whole epoch budget), needed by the
    from-scratch controls and by `final` "scratch" or "best". A latency budget on a target that runs here is
    timed there for up to `measure_rounds` rounds (latency_loop.py; 0: predicted only), a board on the RPC server
    `rpc` (tracker host, port, key) when given. `latency`: the search's
    latency model when the caller already built it (else built here from `target` and `profile`)."""
    if isinstance(budget, str):
        budget = parse_budget(budget)
    structure = structure or analyze(baseline, (data.in_channels, data.input_size, data.input_size), model_name,
                                     drop_blocks=drop_blocks)
    if latency is None and target is not None:
        latency = latency_model(structure, target, profile)
    cost, flops, params, target_cost, baseline_cost = _costs(structure, budget, latency, channel_multiple)
    measure_latency, measure_note = None, ""
    if budget.metric == "latency":
        measure_latency, measure_note = measurer_for(target, baseline, structure, precision, data, measure_rounds,
                                                     rpc=rpc)
    finetune = finetune or TrainConfig()
    if baseline_top1 is None:
        test = data.report_split
        baseline_top1 = evaluate(baseline, test)
    return SearchContext(
        baseline=baseline, structure=structure, data=data, budget=budget, cost=cost, target_cost=target_cost,
        baseline_cost=baseline_cost, flops=flops, params=params, finetune=replace(finetune, seed=seed),
        search_epochs=search_epochs, scratch=None if scratch is None else replace(scratch, seed=seed), final=final,
        channel_multiple=channel_multiple, precision=precision, latency=latency, measure_latency=measure_latency,
        measure_rounds=measure_rounds, measure_note=measure_note, baseline_top1=baseline_top1, run_dir=run_dir,
        seed=seed, options=dict(options or {}), log=log,
    )


def _costs(structure: Structure, budget: Budget, latency: LatencyModel | None, channel_multiple: int):
    """The cost functions of a search and its absolute target; BudgetError when the budget cannot be met."""

    def flops(widths: dict[str, int]) -> float:
        return float(arch_flops(structure, widths))

    def params(widths: dict[str, int]) -> float:
        return float(arch_params(structure, widths))

    if budget.metric == "flops":
        cost = flops
    elif budget.metric == "params":
        cost = params
    else:
        if latency is None:
            raise ConfigError("--metric latency needs --target (a latency table or the target's roofline estimate)")
        cost = latency
    baseline_cost = cost(structure.baseline_widths())
    target_cost = check_budget(budget, baseline_cost, cost(min_widths(structure, channel_multiple)))
    return cost, flops, params, target_cost, baseline_cost


# ---- one search, end to end, in a run directory -------------------------------------------------------------


@dataclass
class SearchSpec:
    """What `edgecompact search` was asked; stored as config.json so a re-run resumes the same search."""

    model: str
    data: str
    method: str
    budget: str
    metric: str | None = None
    tolerance: float = 0.02
    allocation: str | None = None  # knapsack | threshold; None: the metric's (budget.Budget.rule)
    target: str = "host"
    input_size: int | None = None
    limit: int | None = None
    epochs: int = 10
    finetune_epochs: int = 5
    search_epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    channel_multiple: int | None = None  # None: the target's
    drop_blocks: bool = False  # depth pruning: a residual block whose inner channels all go is removed
    precision: str | None = None  # None: the target's
    profile: str | None = None
    weights: str | None = None  # the baseline's trained weights (torch state dict or .safetensors): not retrained
    tune_trials: int = 0  # MetaSchedule trials per task when compiling the deployed models (0: untuned TVM)
    distill: float = 0.0  # weight of the baseline's soft targets in every fine-tune (knowledge distillation)
    final: str = "best"  # final training of the found architecture: inherit | scratch | best (on validation)
    measure_rounds: int | None = None  # a latency budget's timed rounds on a target that runs here (0: predicted
    # only); None: latency_loop.MEASURE_ROUNDS
    options: dict = field(default_factory=dict)


def prepare_run_dir(run_dir: Path, spec: SearchSpec, force: bool) -> None:
    """Create `run_dir`, or resume it when it holds the same search; refuse a different one without --force."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg_path.is_file():
            try:  # through SearchSpec, so that a run made before a new key was added still resumes
                old = asdict(SearchSpec(**json.loads(cfg_path.read_text())))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
                if not force:
                    raise ConfigError(f"{cfg_path}: malformed run configuration ({type(e).__name__}: "
                                      f"{str(e)[:150]}); repair it or pass --force to start the run over") from None
                old = None
            if old == asdict(spec):
                return  # same search: resume
        if not force:
            raise ConfigError(f"--out: {run_dir} already holds a different run; pass --force to overwrite it")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg_path, json.dumps(asdict(spec), indent=1))
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {run_dir}: {e.strerror}") from None


def load_baseline(spec: SearchSpec, data: DataSplits) -> nn.Module:
    """The baseline of `spec` for `data`, with the user's trained weights when it comes with some."""
    from edgecompact.models import load_model, load_weights

    if spec.weights and spec.model.endswith(".onnx"):
        raise ConfigError(f"--weights {spec.weights}: an ONNX model carries its own weights; drop --weights")
    model = load_model(spec.model, num_classes=data.num_classes, in_channels=data.in_channels,
                       input_size=data.input_size)
    if spec.weights:
        load_weights(model, Path(spec.weights), spec.model)
    return model


def baseline_given(spec: SearchSpec) -> bool:
    """Whether the user's baseline comes trained (--weights, or an ONNX model): it is then evaluated, not trained."""
    return bool(spec.weights) or spec.model.endswith(".onnx")


def train_model(model_spec: str, data_spec: str, cfg: TrainConfig, out: Path, *, input_size: int | None = None,
                limit: int | None = None) -> dict:
    """`edgecompact train`: train a model (zoo name or file.py:factory) on a dataset into `out` (checkpoint.pt,
    resumable, and result.json); returns the result record."""
    from edgecompact.cost.flops import module_flops, module_params
    from edgecompact.data import load_dataset
    from edgecompact.models import load_model

    data = load_dataset(data_spec, input_size=input_size, limit=limit, seed=cfg.seed)
    model = load_model(model_spec, num_classes=data.num_classes, in_channels=data.in_channels,
                       input_size=data.input_size)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out: cannot create {out}: {e.strerror}") from None
    hist = train(model, data.train, cfg, val_set=data.val, checkpoint=out / "checkpoint.pt", desc=model_spec)
    shape = (data.in_channels, data.input_size, data.input_size)
    result = {"model": model_spec, "dataset": data.name, "top1": round(evaluate(model, data.report_split), 2),
              "mflops": round(module_flops(model, shape) / 1e6, 3), "params": module_params(model),
              "epochs": cfg.epochs, "train_seconds": round(sum(e["seconds"] for e in hist["epochs"]), 1)}
    write_text_atomic(out / "result.json", json.dumps(result, indent=1))
    return result


def train_baseline(model: nn.Module, data: DataSplits, cfg: TrainConfig, run_dir: Path, log=print) -> float:
    """Train (or resume training) the baseline in `run_dir`; returns its test top-1."""
    done = run_dir / "baseline.pt"
    if done.is_file():
        model.load_state_dict(load_checkpoint(done)["model"])
    else:
        log(f"training the baseline: {cfg.epochs} epochs")
        train(model, data.train, cfg, val_set=data.val, checkpoint=run_dir / "baseline.ckpt", desc="baseline")
        save_atomic({"model": model.state_dict()}, done)
        (run_dir / "baseline.ckpt").unlink(missing_ok=True)
    model.eval()
    return evaluate(model, data.report_split)


def search_multiple(target, given: int | None, latency_budget: bool):
    """The target with the channel multiple a search uses: `given` (--channel-multiple), else the target's.

    A multiple read from this CPU (host: its fp32 lanes) applies to a latency budget, where milliseconds decide:
    widths then step with the kernels' vector blocks, as the table was profiled. FLOP and parameter budgets count
    operations, and a CIFAR ResNet's 16-wide first stage cannot shrink in steps of 16, so 1/3 of the FLOPs would be
    out of reach on AVX-512: there it stays 1 unless given."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"--channel-multiple {given}: expected an integer >= 1")
        return replace(target, channel_multiple=given, multiple_from="--channel-multiple", multiple_from_cpu=False)
    if target.multiple_from_cpu and not latency_budget:
        return replace(target, channel_multiple=1, multiple_from_cpu=False,
                       multiple_from=f"a FLOP/parameter budget; latency searches use {target.channel_multiple} from "
                                     f"{target.multiple_from}")
    return replace(target, multiple_from=f"from {target.multiple_from}")


def _profile_table(structure: Structure, target, path: Path):
    from edgecompact.profiling import profile

    # the per-user cache: a second search that needs the same table waits for the one measuring it, then reuses it
    return profile(structure, target, path, wait=True)


def search_latency_model(structure: Structure, target, profile: Path | None, *, needs_ms: bool,
                         log=print) -> LatencyModel:
    """The one latency model of a search: `profile`, the target's table for this CPU, or the labelled roofline;
    where milliseconds decide (`needs_ms`: a latency budget, a latency-weighted method) a missing host table is
    measured on first use."""
    return latency_model(structure, target, profile, build=_profile_table if needs_ms else None, log=log)


def board_address(target, rpc_tracker: str | None, rpc_key: str | None) -> tuple[str, int, str] | None:
    """(tracker host, port, key) of the boards a search times a target on, or None without --rpc."""
    if not rpc_tracker:
        return None
    from edgecompact.rpc import parse_address

    key = rpc_key or target.rpc_key
    if not key:
        raise ConfigError(f"--key: required with --rpc (target {target.name} has no rpc_key)")
    return (*parse_address(rpc_tracker), key)


def run_search(spec: SearchSpec, run_dir: Path, *, force: bool = False, deploy: bool = True,
               baseline_artifact: Path | None = None, rpc_tracker: str | None = None, rpc_key: str | None = None,
               command: str | None = None, log=print) -> dict:
    """`edgecompact search`: baseline -> method -> compact model, arch.json, report.json/md (and deploy).

    `command`: how the caller asked for it, for the report (default: the equivalent `edgecompact search` line)."""
    from edgecompact.data import load_dataset
    from edgecompact.methods.base import FINALS, get_method, run_method, uses_latency
    from edgecompact.report import result_record, write_report
    from edgecompact.targets import get_target

    target = get_target(spec.target)
    # a board's address, checked before any training (a missing key is the user's slip); targets run here use none
    board = None if target.runnable_here else board_address(target, rpc_tracker, rpc_key)
    get_method(spec.method)  # fail fast on an unknown method
    if not 0 <= spec.distill <= 1:
        raise ConfigError(f"--distill {spec.distill:g}: expected a weight in [0, 1]")
    if spec.final not in FINALS:
        raise ConfigError(f"--final {spec.final}: choose {', '.join(FINALS)}")
    measure_rounds = MEASURE_ROUNDS if spec.measure_rounds is None else spec.measure_rounds
    if measure_rounds < 0:
        raise ConfigError(f"--measure-rounds {measure_rounds}: expected 0 (predicted only) or more")
    budget = parse_budget(spec.budget, spec.metric, spec.tolerance, spec.allocation)
    run_dir = Path(run_dir)
    data = load_dataset(spec.data, input_size=spec.input_size, limit=spec.limit, seed=spec.seed)
    for note in data.notes:
        log(note)
    model = load_baseline(spec, data)
    target = search_multiple(target, spec.channel_multiple, budget.metric == "latency")
    multiple = target.channel_multiple
    precision = spec.precision or target.precision
    profile = Path(spec.profile) if spec.profile else None
    structure = analyze(model, (data.in_channels, data.input_size, data.input_size), spec.model,
                        drop_blocks=spec.drop_blocks)
    # the one cost model of this search; measured on this CPU on first use where milliseconds decide
    needs_ms = budget.metric == "latency" or uses_latency(spec.method)
    latency = search_latency_model(structure, target, profile, needs_ms=needs_ms, log=log)
    _costs(structure, budget, latency, multiple)  # an impossible budget fails before any training
    prepare_run_dir(run_dir, spec, force)
    log(f"channel multiple {multiple} ({target.multiple_from})")
    cfg = TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
    t0 = time.perf_counter()
    given = baseline_given(spec)
    if given:
        log(f"baseline: {spec.weights or spec.model} as given, not trained; from-scratch trainings get "
            f"{total_epochs(spec)} epochs (--epochs {spec.epochs} + search + fine-tune: the baseline's own are unknown)")
        base_val = evaluate(model.eval(), data.val)
        base_top1 = evaluate(model, data.report_split)
    else:
        base_top1 = train_baseline(model, data, cfg, run_dir, log)
    base_wall = time.perf_counter() - t0
    write_text_atomic(run_dir / "structure.json", json.dumps(structure.to_dict()))
    write_text_atomic(run_dir / "preprocess.json", json.dumps(preprocessing(data), indent=1))
    ctx = build_context(model, data, budget, model_name=spec.model,
                        finetune=replace(cfg, epochs=spec.finetune_epochs, distill_alpha=spec.distill),
                        search_epochs=spec.search_epochs, final=spec.final,
                        scratch=replace(cfg, epochs=total_epochs(spec), distill_alpha=spec.distill),
                        channel_multiple=multiple, precision=precision, target=target, profile=profile,
                        run_dir=run_dir, seed=spec.seed, options=spec.options, structure=structure,
                        baseline_top1=base_top1, measure_rounds=measure_rounds, latency=latency,
                        rpc=board, log=log)
    lat_source = latency.label
    result_path = run_dir / "result.json"
    if result_path.is_file() and (run_dir / "compact.pt").is_file():
        log(f"{spec.method}: already finished in {run_dir}; rebuilding the report")
        result = read_json(result_path)
        if not (run_dir / "compact.safetensors").is_file():  # finished before it was written
            write_safetensors(load_compact(run_dir)[0], run_dir / "compact.safetensors", spec)
    else:
        log(f"searching with {spec.method}: {budget.describe()} on {target.name}")
        res = run_method(spec.method, ctx)
        res.arch.save(run_dir / "arch.json")
        save_atomic({"model": res.model.state_dict()}, run_dir / "compact.pt")
        write_safetensors(res.model, run_dir / "compact.safetensors", spec)
        write_text_atomic(run_dir / "history.json", json.dumps(res.history, indent=1, default=str))
        result = dict(res.metrics, widths=res.arch.widths)
        write_text_atomic(result_path, json.dumps(result, indent=1))
    base_widths = structure.baseline_widths()
    baseline_metrics = {"mflops": round(ctx.flops(base_widths) / 1e6, 3), "params": int(ctx.params(base_widths)),
                        "top1": round(base_top1, 2), "wall_s": round(base_wall, 1), "widths": base_widths}
    if ctx.latency is not None:
        baseline_metrics["latency_ms"] = {"predicted": round(ctx.latency(base_widths), 4)}
    records = [result_record("baseline", spec, baseline_metrics, target.name, lat_source),
               result_record(spec.method, spec, result, target.name, lat_source)]
    if given:  # the user's trained baseline: say so, with what it scored on both splits
        records[0].update(given=spec.weights or spec.model, val_top1=round(base_val, 2))
    if deploy:
        from edgecompact.deploy_stage import deploy_run

        compact = load_compact(run_dir)[0]
        deploy_run(run_dir, records, model, compact, data, target, precision=precision,
                   tune_trials=spec.tune_trials, baseline_dir=baseline_artifact, rpc_tracker=rpc_tracker,
                   rpc_key=rpc_key, log=log)
    command = command or search_command(spec)
    report = write_report(run_dir, records, command=command, protocol=_protocol(spec, data.notes))
    return report


def preprocessing(data: DataSplits) -> dict:
    """What the run's models expect of an image, for a user who feeds them elsewhere (preprocess.json)."""
    return {"input_shape": [data.in_channels, data.input_size, data.input_size],
            "normalize": "pixels scaled to [0, 1], then (x - mean) / std per channel (train split statistics)",
            "mean": list(data.mean), "std": list(data.std), "classes": list(data.classes)}


def search_command(spec: SearchSpec) -> str:
    """The `edgecompact search` line that asks for `spec` (options that differ from their defaults)."""
    defaults = asdict(SearchSpec(model=spec.model, data=spec.data, method=spec.method, budget=spec.budget))
    args = [f"--model {spec.model}", f"--data {spec.data}", f"--method {spec.method}", f"--budget {spec.budget}"]
    for key, value in asdict(spec).items():
        if key in ("model", "data", "method", "budget", "options") or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        args.append(flag if value is True else f"{flag} {value}")
    args += [f"--set {k}={v}" for k, v in spec.options.items()]
    return "edgecompact search " + " ".join(args)


def total_epochs(spec: SearchSpec) -> int:
    """Every epoch the protocol gives a method (baseline + search + fine-tune): a from-scratch training's budget."""
    return spec.epochs + spec.search_epochs + spec.finetune_epochs


def _protocol(spec: SearchSpec, notes: tuple[str, ...] = ()) -> str:
    if baseline_given(spec):
        epochs = (f"baseline given ({spec.weights or spec.model}, not trained), {spec.search_epochs} search + "
                  f"{spec.finetune_epochs} fine-tune epochs (from scratch: {total_epochs(spec)}, counting "
                  f"--epochs {spec.epochs} for the baseline's unknown own)")
    else:
        epochs = (f"{spec.epochs} baseline + {spec.search_epochs} search + {spec.finetune_epochs} fine-tune epochs "
                  f"(from scratch: {total_epochs(spec)})")
    return (f"{spec.model}, {spec.data}{f' ({spec.limit} train)' if spec.limit else ''}, "
            f"{epochs}, final training {spec.final} (chosen on validation), "
            f"budget {spec.budget} {spec.metric or ''}".strip()
            + (f", distillation {spec.distill:g}" if spec.distill else "") + "".join(f"; {n}" for n in notes))


def write_safetensors(model: nn.Module, path: Path, spec: SearchSpec) -> None:
    """The compact model's weights as safetensors (tensors only: readable without pickle, from any framework);
    arch.json beside it holds the widths and kept channels that rebuild the module (`edgecompact.load_compact`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": "pt", "model": spec.model, "architecture": "arch.json"})
    write_atomic(path, lambda f: f.write(blob))


def load_compact(run_dir: Path) -> tuple[nn.Module, SearchSpec, Structure]:
    """Rebuild the compact model of a finished run directory (baseline architecture, slimmed, weights loaded)."""
    from edgecompact.structure import ArchSpec, slim

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.json)")
    try:
        spec = SearchSpec(**json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ConfigError(f"{cfg_path}: malformed ({e})") from None
    for name in ("arch.json", "compact.pt", "structure.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: the search has not finished ({name} missing); re-run the search to resume")
    try:
        structure = Structure.from_dict(read_json(run_dir / "structure.json"))
        c, h, _ = structure.input_shape
        n_classes = next(layer.out_channels for layer in reversed(structure.layers) if layer.out_group is None)
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
        raise ConfigError(f"{run_dir / 'structure.json'}: not a valid structure ({type(e).__name__}: {e})") from None
    from edgecompact.models import load_model

    base = load_model(spec.model, num_classes=n_classes, in_channels=c, input_size=h)
    arch = ArchSpec.load(run_dir / "arch.json")
    try:  # a hand-edited arch.json: unknown groups, no `keep`, indices out of range
        model = slim(base, structure, arch.keep or {})
    except (ConfigError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{run_dir / 'arch.json'}: does not fit this run's model ({e})") from None
    try:
        model.load_state_dict(load_checkpoint(run_dir / "compact.pt")["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"{run_dir / 'compact.pt'}: does not fit arch.json "
                          f"({str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__})") from None
    return model.eval(), spec, structure
