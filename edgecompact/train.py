"""Training, fine-tuning, distillation and evaluation: SGD with a cosine schedule, in one short loop.

Checkpoints are written atomically after every epoch and a re-run resumes from the last one. One process on the
CPU by default, CUDA when present, DistributedDataParallel when launched under `torchrun`. Search methods plug in
through `regularizer` (a loss term) and `after_step` (e.g. zeroing tiny weights); nothing method-specific lives here.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from edgecompact.errors import ConfigError
from edgecompact.storage import write_atomic


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128  # global batch; each DDP rank takes batch_size / world_size
    seed: int = 0
    augment: bool = False  # random crop (pad 2) on the fly
    distill_alpha: float = 0.0  # weight of the teacher's soft targets
    distill_temperature: float = 4.0
    shuffle: bool = True
    progress: bool = True
    optimizer: str = "sgd"  # "sgd" | "adam"


def cosine(step: int, total: int) -> float:
    """The schedule's factor on the base learning rate at `step` of `total` (cosine from 1 to 0)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def schedule_steps(cfg: TrainConfig, n: int) -> int:
    """Optimizer steps `train` takes over `n` training images with `cfg` (one process)."""
    return max(1, n // min(cfg.batch_size, n)) * max(1, cfg.epochs)


def lr_sum(cfg: TrainConfig, n: int) -> float:
    """Sum of the learning rates `train` applies over `n` training images: how far a constant gradient (a
    regularizer's pull) moves a weight, before momentum's 1 / (1 - momentum) gain."""
    steps = schedule_steps(cfg, n)
    return cfg.lr * sum(cosine(s, steps) for s in range(steps))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def distributed() -> tuple[int, int]:
    """(rank, world size), initializing the process group once when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _batches(n: int, batch: int, epoch: int, cfg: TrainConfig, rank: int, world: int):
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(n, generator=g) if cfg.shuffle else torch.arange(n)
    steps = n // batch if n >= batch else 1
    for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        yield idx[rank::world]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    pad = 2
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
    return xp[..., dy:dy + h, dx:dx + w]


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 500, device: torch.device | None = None,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy in percent."""
    device = device or next(model.parameters()).device
    x_all, y_all = data.tensors
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y_all), batch_size):
        x = x_all[i:i + batch_size].to(device)
        if transform is not None:
            x = transform(x)
        correct += (model(x).argmax(1).cpu() == y_all[i:i + batch_size]).sum().item()
    model.train(was)
    return 100.0 * correct / max(1, len(y_all))


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temporary file renamed into place: a kill, a signal or a full disk (StorageError,
    one line) leaves the previous checkpoint whole."""
    write_atomic(Path(path), lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by `train` (tensors and plain containers only: weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file, reported in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a loadable checkpoint ({first[:200]})") from None


def train(model: nn.Module, train_set: TensorDataset, cfg: TrainConfig, *, val_set: TensorDataset | None = None,
          checkpoint: Path | None = None, teacher: nn.Module | None = None,
          regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
          after_step: Callable[[nn.Module], None] | None = None,
          extra_params: list[nn.Parameter] | None = None,
          device: torch.device | None = None, desc: str = "train") -> dict:
    """Train `model` in place; returns the history {"epochs": [{"epoch", "loss", "val_top1", "seconds"}...]}.

    With `checkpoint`, state is saved after every epoch and an existing checkpoint is resumed.
    """
    rank, world = distributed()
    device = device or default_device()
    torch.manual_seed(cfg.seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.momentum > 0)
    x_all, y_all = train_set.tensors
    batch = max(world, min(cfg.batch_size, len(y_all)))
    steps_per_epoch = max(1, len(y_all) // batch)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, total))
    history: dict = {"config": asdict(cfg), "epochs": []}
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        start = int(state["epoch"]) + 1
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 7)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        total_loss, seen = 0.0, 0
        bar = tqdm(_batches(len(y_all), batch, epoch, cfg, rank, world), total=steps_per_epoch,
                   desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=not cfg.progress or rank != 0)
        for idx in bar:
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if cfg.augment:
                x = _augment(x, aug_gen)
            out = net(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None and cfg.distill_alpha > 0:
                with torch.no_grad():
                    t_out = teacher(x)
                temp = cfg.distill_temperature
                kd = F.kl_div(F.log_softmax(out / temp, 1), F.softmax(t_out / temp, 1), reduction="batchmean")
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * temp * temp * kd
            if regularizer is not None:
                loss = loss + regularizer(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            total_loss += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        record = {"epoch": epoch, "loss": total_loss / max(1, seen), "seconds": time.perf_counter() - t0}
        if val_set is not None:
            record["val_top1"] = evaluate(model, val_set, device=device)
        history["epochs"].append(record)
        if checkpoint is not None and rank == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "epoch": epoch, "history": history}, Path(checkpoint))
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Re-estimate BatchNorm running statistics (plain average over `batches`) after channels were removed.

    A few fine-tune steps cannot move the stale statistics far enough (momentum 0.1), and a candidate judged on
    them looks far worse than it is.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    device = next(model.parameters()).device
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was)

