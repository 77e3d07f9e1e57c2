"""The `edgecompact` command. Each subcommand is one stage, runnable alone on files the previous stage wrote.

User mistakes (UserError) are caught here, once, and printed as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from edgecompact.errors import ConfigError, UserError
from edgecompact.storage import exclusive, full_disk


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=int, default=None, help="default: the model's paper setting")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--input-size", type=int, default=None, help="default: the model's paper setting")


def _resolve_model(args: argparse.Namespace, spec: str):
    """(model, size, classes) for a zoo name (defaults: its paper setting), a user's file.py:factory or an ONNX
    file (its own input size when --input-size is not given)."""
    from edgecompact.models import load_model, model_defaults

    size, classes = args.input_size, args.num_classes
    if spec.endswith(".onnx"):
        import torch

        from edgecompact.models.onnx_import import onnx_input_size

        size = size or onnx_input_size(Path(spec))
        model = load_model(spec, num_classes=classes, in_channels=args.in_channels, input_size=size)
        with torch.no_grad():
            out = model(torch.zeros(1, args.in_channels, size, size))
        return model, size, classes or int(out.shape[1])
    if ":" not in spec:
        d = model_defaults(spec)
        size, classes = size or d.input_size, classes or d.num_classes
    size, classes = size or 32, classes or 10
    return load_model(spec, num_classes=classes, in_channels=args.in_channels, input_size=size), size, classes


def cmd_models(args: argparse.Namespace) -> int:
    from edgecompact.cost.flops import module_flops, module_params
    from edgecompact.models import create_model, list_models, model_defaults

    print(f"{'model':<22}{'classes':>8}{'input':>7}{'MFLOPs':>12}{'params':>12}")
    for name in list_models():
        d = model_defaults(name)
        m = create_model(name, num_classes=d.num_classes, in_channels=d.in_channels, input_size=d.input_size)
        f = module_flops(m, (d.in_channels, d.input_size, d.input_size))
        print(f"{name:<22}{d.num_classes:>8}{d.input_size:>7}{f / 1e6:>12.3f}{module_params(m):>12,}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from edgecompact.cost.flops import module_flops, module_params

    m, size, classes = _resolve_model(args, args.model)
    shape = (args.in_channels, size, size)
    out = {"model": args.model, "input_shape": list(shape), "num_classes": classes,
           "mflops": round(module_flops(m, shape) / 1e6, 3), "params": module_params(m)}
    if args.groups:
        from edgecompact.structure import analyze

        out["groups"] = analyze(m, shape, args.model).groups
    print(json.dumps(out, indent=1))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from edgecompact.pipeline import train_model
    from edgecompact.train import TrainConfig

    out = Path(args.out)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      augment=args.augment)
    with exclusive(out, f"--out {out}", _log):
        result = train_model(args.model, args.data, cfg, out, input_size=args.input_size, limit=args.limit)
    print(json.dumps(result, indent=1))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from edgecompact.targets import get_target, list_targets

    for name in list_targets():
        t = get_target(name)
        why = f" from {t.multiple_from}" if t.multiple_from_cpu else ""
        print(f"{t.name:<10} {t.description}  [multiple {t.channel_multiple}{why}, {t.precision}, "
              f"{'runs here' if t.runnable_here else 'board: RPC key ' + str(t.rpc_key)}]")
    return 0


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, got '{item}'")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from datetime import datetime

    from edgecompact.pipeline import SearchSpec, run_search
    from edgecompact.report import markdown_table

    spec = SearchSpec(**{f.name: getattr(args, f.name) for f in fields(SearchSpec) if f.name != "options"},
                      options=_parse_options(args.set))
    name = args.model.split(":")[-1].replace("/", "_")
    out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{args.method}-{name}")
    if args.rpc:
        from edgecompact.rpc import parse_address

        parse_address(args.rpc)  # a malformed HOST:PORT fails before any training
    with exclusive(out, f"--out {out}", _log):  # one process per run directory
        doc = run_search(spec, out, force=args.force, deploy=not args.no_deploy, rpc_tracker=args.rpc,
                         command=" ".join(["edgecompact", *sys.argv[1:]]),
                         rpc_key=args.key, log=_log)
    print(markdown_table(doc))
    print(f"run directory: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from edgecompact.report import bench_document, load_records, markdown_table, plot, write_bench

    records = load_records([Path(p) for p in args.runs])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["edgecompact", *sys.argv[1:]])
    doc = bench_document("report", command, "collected from " + ", ".join(args.runs), records)
    write_bench(out / "report.json", doc)
    pngs = plot(records, out)
    print(markdown_table(doc))
    print("written: " + ", ".join(str(p) for p in [out / "report.json", out / "report.md", *pngs]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgecompact.demo import run_demo

    report = run_demo(Path(args.out), methods=args.methods, deploy=not args.no_deploy,
                      tune_trials=args.tune_trials, log=_log)
    print(report.read_text())
    print(f"report: {report} (plots beside it)")
    return 0


def _model_for_export(args: argparse.Namespace):
    """(model, input_shape, data or None, out dir) from a run directory or a model spec."""
    src = Path(args.source)
    if src.is_dir():
        from edgecompact.data import load_dataset
        from edgecompact.pipeline import load_compact

        model, spec, structure = load_compact(src)
        data = load_dataset(spec.data, input_size=spec.input_size, limit=spec.limit, seed=spec.seed)
        c, h, w = structure.input_shape
        return model, (1, c, h, w), data, src / "deploy"
    data = None
    if args.data:
        from edgecompact.data import load_dataset

        data = load_dataset(args.data, input_size=args.input_size)
        args.num_classes, args.input_size = data.num_classes, data.input_size
    model, size, _ = _resolve_model(args, args.source)
    if args.weights:
        from edgecompact.models import load_weights

        load_weights(model, Path(args.weights), args.source)
    return model.eval(), (1, args.in_channels, size, size), data, Path("artifacts") / args.source.split(":")[-1]


def cmd_export(args: argparse.Namespace) -> int:
    from edgecompact.deploy.artifact import export_artifact
    from edgecompact.targets import get_target

    target = get_target(args.target)
    model, shape, data, default_out = _model_for_export(args)
    precision = args.precision or target.precision
    calib = eval_data = None
    if data is not None:
        test = data.report_split
        eval_data = (test.tensors[0][:args.eval_samples].numpy(), test.tensors[1][:args.eval_samples].numpy())
        calib = data.train.tensors[0][:args.calib_samples].numpy()
    elif precision == "int8":
        raise ConfigError("--precision int8 needs calibration data: export a run directory or give --data")
    out = Path(args.out) if args.out else default_out / target.name
    manifest = export_artifact(model, shape, target, out, precision=precision, tune_trials=args.tune_trials,
                               db_dir=Path(args.tuning_db) if args.tuning_db else None, calib=calib,
                               eval_data=eval_data, threads=args.threads, runs=args.runs,
                               overwrite=args.overwrite)
    print(Path(manifest).read_text())
    print(f"artifact: {out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import tempfile

    from edgecompact.deploy import onnx as eonnx
    from edgecompact.deploy import tvm as etvm
    from edgecompact.deploy.artifact import relax_module
    from edgecompact.targets import get_target

    target = get_target(args.target)
    if (why := etvm.runnable_here(target)) is not None:
        raise ConfigError(f"--target {target.name}: not tunable here, tuning times every candidate on the target "
                          f"({why})")
    for flag, value in (("--trials-per-task", args.trials_per_task), ("--chunk", args.chunk)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected at least 1")
    db = Path(args.tuning_db) if args.tuning_db else etvm.default_db_dir(target)
    etvm.set_num_threads(1)  # the tuner's runner workers inherit it: candidates are timed on one core
    results = {}
    for label, model, shape in _tune_sources(args):
        with tempfile.TemporaryDirectory() as tmp:
            eonnx.export_onnx(model, shape, Path(tmp) / "model.onnx")
            mod = relax_module(Path(tmp) / "model.onnx")[0]
        _log(f"tuning {label} {list(shape)} into {db}: {args.trials_per_task} trials per task in all, "
             f"{args.chunk} per resumable step")
        results[label] = etvm.tune(mod, target, args.trials_per_task, db, chunk=args.chunk,
                                   progress=lambda line, label=label: _log(f"{label}: {line}"))
    print(json.dumps({"db": str(db), **results}, indent=1))
    return 0


def _tune_sources(args: argparse.Namespace) -> list[tuple[str, object, tuple[int, ...]]]:
    """(label, model, input shape) to tune: a run directory's compact and its baseline architecture (the two a
    search deploys), or the one model a spec names."""
    model, shape, _, _ = _model_for_export(argparse.Namespace(**{**vars(args), "data": None}))
    if not Path(args.source).is_dir():
        return [(args.source, model, shape)]
    import torch

    from edgecompact.models import load_model
    from edgecompact.pipeline import load_compact

    _, spec, _ = load_compact(Path(args.source))
    with torch.no_grad():
        classes = int(model(torch.zeros(shape)).shape[1])
    base = load_model(spec.model, num_classes=classes, in_channels=shape[1], input_size=shape[2]).eval()
    return [("compact", model, shape), ("baseline", base, shape)]


def cmd_bench(args: argparse.Namespace) -> int:
    from edgecompact.deploy.bench import bench_artifacts

    doc = bench_artifacts([Path(p) for p in args.artifacts], runs=args.runs, threads=args.threads,
                          rpc_tracker=args.rpc, rpc_key=args.key)
    print(json.dumps(doc, indent=1))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from edgecompact import profiling
    from edgecompact.cost.latency import default_table_path
    from edgecompact.deploy import tvm as etvm
    from edgecompact.pipeline import board_address, search_multiple
    from edgecompact.structure import analyze
    from edgecompact.targets import get_target

    # a table is profiled at the multiple a latency search will step by
    target = search_multiple(get_target(args.target), args.channel_multiple, latency_budget=True)
    model, size, _ = _resolve_model(args, args.model)
    structure = analyze(model, (args.in_channels, size, size), args.model)
    out = Path(args.out) if args.out else default_table_path(target, args.model)
    rpc = board_address(target, args.rpc, args.key)
    etvm.set_num_threads(args.threads)
    table = profiling.profile(structure, target, out, rpc=rpc, runtime=args.runtime, threads=args.threads,
                              tune_trials=args.tune_trials)
    ms = table.predict(structure, structure.baseline_widths())
    print(f"{out}: {len(table.entries)} layer kinds; baseline {ms:.3f} ms predicted ({table.label})")
    return 0


def cmd_rpc_server(args: argparse.Namespace) -> int:
    from edgecompact.rpc import parse_address, serve

    tracker = parse_address(args.tracker, "--tracker") if args.tracker else None
    serve(args.key, args.host, args.port, tracker=tracker, tracker_port=args.tracker_port)
    return 0


def _log(msg: str) -> None:
    print(f"[edgecompact] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecompact", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the zoo with FLOPs and params").set_defaults(fn=cmd_models)

    p = sub.add_parser("flops", help="FLOPs and params of a zoo or user model")
    p.add_argument("model", help="zoo name, path/to/file.py:factory or package.module:factory")
    _model_args(p)
    p.add_argument("--groups", action="store_true", help="also list the coupled channel groups")
    p.set_defaults(fn=cmd_flops)

    p = sub.add_parser("train", help="train a model (resumes from OUT/checkpoint.pt)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="digits", help="digits | fashion-mnist[:PATH] | mnist:PATH | cifar10:PATH | "
                   "cifar100:PATH | imagenet64:PATH")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augment", action="store_true", help="random crops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_train)

    sub.add_parser("targets", help="list the targets").set_defaults(fn=cmd_targets)

    p = sub.add_parser("search", help="find, fine-tune and deploy a compact architecture under a budget")
    p.add_argument("--model", required=True, help="zoo name, path/to/file.py:factory, package.module:factory or "
                   "path/to/model.onnx (trained: it is not retrained)")
    p.add_argument("--weights", default=None, metavar="FILE", help="the model's trained weights (torch state dict, "
                   "read weights_only, or .safetensors): the baseline is evaluated, not trained")
    p.add_argument("--data", default="digits", help="digits | fashion-mnist[:PATH] | mnist:PATH | cifar10:PATH | "
                   "cifar100:PATH | imagenet64:PATH | folder:DIR (DIR/train/<class>/*.png|jpg, + val/, test/)")
    p.add_argument("--method", required=True)
    p.add_argument("--budget", default="1/3x", help="1/3x or 0.33x (of the baseline), 48M, 120k, 12ms")
    p.add_argument("--metric", choices=["flops", "params", "latency"], default=None)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--allocation", choices=["knapsack", "threshold"], default=None,
                   help="how channel scores are cut to the budget (default: knapsack for latency, else threshold)")
    p.add_argument("--target", default="host")
    p.add_argument("--profile", default=None, help="latency table JSON (default: this CPU's table in the user cache "
                   "for the host, built on first use by latency searches; profiles/<target>-*.json for boards)")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    p.add_argument("--search-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--distill", type=float, default=0.0, metavar="ALPHA", help="fine-tunes distil the baseline's "
                   "soft targets with this weight (0: off; the methods benchmark uses 0.5)")
    p.add_argument("--final", choices=["inherit", "scratch", "best"], default="best",
                   help="final training of the found network: inherit (fine-tune its weights), scratch (random init, "
                   "baseline + search + fine-tune epochs) or best (both; the higher validation top-1 wins)")
    p.add_argument("--measure-rounds", type=int, default=None, metavar="N", help="a latency budget on a target "
                   "that runs here is met on measured ms: the found widths are timed paired with the baseline and "
                   "re-fitted, at most N timed rounds (default 3; 0: predicted latency only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channel-multiple", type=int, default=None,
                   help="every searched width a multiple of this (default: the target's; host: this CPU's fp32 lanes)")
    p.add_argument("--drop-blocks", action="store_true", help="depth pruning: let the search remove residual "
                   "blocks whose inner channels all go (a removed block costs no conv at all)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None, help="default: the target's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--out", default=None, help="run directory (default runs/<time>-<method>-<model>)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory holding a different run")
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per task for the deployed "
                   "models (0: untuned TVM)")
    p.add_argument("--rpc", default=None, help="tracker HOST:PORT: time the board in a latency budget's closed loop "
                   "and measure the deployed models on it")
    p.add_argument("--key", default=None, help="RPC key (default: the target's rpc_key)")
    p.add_argument("--no-deploy", action="store_true")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("profile", help="measure a per-layer latency table for a target (resumable)")
    p.add_argument("--target", default="host")
    p.add_argument("--model", required=True)
    _model_args(p)
    p.add_argument("--rpc", default=None, help="tracker HOST:PORT: measure on the boards registered under --key")
    p.add_argument("--key", default=None, help="RPC key (default: the target's rpc_key)")
    p.add_argument("--out", default=None, help="default: <target>-<precision>-<model>-m<multiple>.json in this CPU's "
                   "cache folder (~/.cache/edgecompact/profiles/<cpu>/) for the host, else profiles/ (boards)")
    p.add_argument("--channel-multiple", type=int, default=None,
                   help="widths profiled in steps of this (default: the target's; host: this CPU's fp32 lanes)")
    p.add_argument("--runtime", choices=["tvm", "onnxruntime"], default=None,
                   help="default: the target's runtime (host: onnxruntime)")
    p.add_argument("--tune-trials", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("rpc-server", help="a TVM RPC server (and tracker) on 127.0.0.1 unless --host is given")
    p.add_argument("--key", default="host")
    p.add_argument("--host", default="127.0.0.1", help="TVM RPC has no authentication: bind to loopback or a "
                   "trusted network only")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--tracker", default=None, help="register with this tracker HOST:PORT (default: start one)")
    p.add_argument("--tracker-port", type=int, default=9190)
    p.set_defaults(fn=cmd_rpc_server)

    p = sub.add_parser("export", help="ONNX + TVM artifact for a target, verified and timed")
    p.add_argument("source", help="a run directory, or a model (zoo name or file.py:factory)")
    p.add_argument("--target", default="host")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None, help="default: the target's")
    p.add_argument("--data", default=None, help="dataset for accuracy and int8 calibration (model sources)")
    p.add_argument("--weights", default=None, help="checkpoint for a model source (loaded weights_only)")
    _model_args(p)
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per task (0: untuned)")
    p.add_argument("--tuning-db", default=None)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default=None, help="default: RUN_DIR/deploy/<target> or artifacts/<model>/<target>")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("tune", help="MetaSchedule-tune a model for a target that runs here (resumable; "
                       "for hours, in the background)")
    p.add_argument("source", help="a run directory (its compact and baseline), or a model (zoo name, file.py:factory, "
                   "ONNX)")
    p.add_argument("--target", default="host")
    _model_args(p)
    p.add_argument("--trials-per-task", type=int, default=256,
                   help="trials every conv/matmul task gets in all (TVM's guidance: 200 to 500)")
    p.add_argument("--chunk", type=int, default=64, help="trials per step; progress is kept after each step")
    p.add_argument("--tuning-db", default=None, help="default: this CPU's database in ~/.cache/edgecompact/tuning/")
    p.set_defaults(fn=cmd_tune, weights=None)

    p = sub.add_parser("bench", help="time artifacts: torch, onnxruntime, TVM (local or over RPC)")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rpc", default=None, help="tracker HOST:PORT for a remote board")
    p.add_argument("--key", default=None)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on digits: every method at 1/3 FLOPs, deployed, reported")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per task (0: untuned TVM)")
    p.add_argument("--no-deploy", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("report", help="paper-style table and plots from run directories")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="report")
    p.set_defaults(fn=cmd_report)
    return parser


def _interrupt_in(owner: int):
    """A handler making SIGTERM (a scheduler) and SIGINT (Ctrl-C) unwind process `owner` like Ctrl-C: files are
    written atomically and checkpoints after each epoch, so the last complete ones stay; locks are released on
    the way out. A forked child (e.g. a TVM tracker) dies of the signal as it would have without it."""

    def interrupt(signum: int, _frame) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the unwinding short
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return interrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        handler = _interrupt_in(os.getpid())
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return args.fn(args)
    except UserError as e:
        print(f"edgecompact: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e.args[0]) if e.args and str(e.args[0]).startswith("SIG") else "SIGINT"
        out = getattr(args, "out", None)
        print(f"edgecompact: interrupted by {name}: finished epochs and measurements are kept"
              f"{f' in {out}' if out else ''}; re-run the same command to resume", file=sys.stderr)
        return 128 + signal.Signals[name].value
    except OSError as e:  # a full disk where no atomic writer caught it (e.g. a report or an export)
        if (reason := full_disk(e)) is None:
            raise
        where = e.filename or getattr(args, "out", None)
        print(f"edgecompact: error: writing {where or 'a file'}: {reason}; free some space and re-run the same "
              "command", file=sys.stderr)
        return 2
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
