"""Training, evaluation and entropy measurement, single-process or under torchrun (DDP).

Training: SGD with momentum and weight decay, a per-step LR schedule, masks re-applied after every
step, ``DistributedSampler`` shards. Evaluation and entropy counting shard the data without padding
and all-reduce integer counts, so any number of processes gives exactly one process's numbers.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from nepenthe_compress.data import iter_batches
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.errors import UserError
from nepenthe_compress.prune.dist import DistContext
from nepenthe_compress.prune.masks import apply_masks, attach_masks


class TrainingError(UserError):
    """Training cannot go on (diverged loss, unusable labels, ...)."""


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _multistep(total: int) -> Callable[[int], float]:
    milestones = (0.5 * total, 0.75 * total)
    return lambda step: 0.1 ** sum(step >= m for m in milestones)


# schedule name -> (total steps -> LR factor of step)
SCHEDULES: dict[str, Callable[[int], Callable[[int], float]]] = {
    "cosine": _cosine, "multistep": _multistep, "constant": lambda total: (lambda step: 1.0)}


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64          # global: each of W processes takes batch_size // W
    schedule: str = "cosine"


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr when ``enabled`` and stderr is a terminal; yields ``advance``."""
    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda: bar.advance(task)


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, cfg: TrainConfig, ctx: DistContext,
          masks: Mapping[str, Tensor], *, seed: int, progress: bool = False,
          desc: str = "training") -> float | None:
    """Train ``model`` in place for ``epochs``; the last epoch's mean loss over all ranks (None for
    no epochs). The masks are applied first and after every optimizer step."""
    model.to(ctx.device)
    masks = {k: m.to(ctx.device) for k, m in masks.items()}
    apply_masks(model, masks)
    if epochs <= 0:
        return None
    torch.manual_seed(seed)
    model.train()
    net = model if ctx.world == 1 else DistributedDataParallel(
        model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    hook = attach_masks(opt, model, masks)
    sampler = DistributedSampler(range(len(x)), num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    per_rank = max(1, cfg.batch_size // ctx.world)
    steps = math.ceil(len(sampler) / per_rank)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[cfg.schedule](epochs * steps))
    loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    try:
        with progress_bar(epochs * steps, desc, progress and ctx.main) as advance:
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), dtype=torch.int64)
                loss_sum.zero_()
                for idx in order.split(per_rank):
                    if len(idx) == 1 < per_rank:   # a lone trailing sample: BatchNorm cannot train on it
                        continue
                    xb, yb = x[idx].to(ctx.device), y[idx].to(ctx.device)
                    loss = F.cross_entropy(net(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    loss_sum += torch.stack([loss.detach().double() * len(idx), torch.tensor(
                        float(len(idx)), dtype=torch.float64, device=ctx.device)])
                    advance()
    finally:
        hook.remove()
    ctx.sync_buffers(model)
    total = ctx.all_reduce_sum(loss_sum)
    mean = float(total[0] / total[1])
    if not math.isfinite(mean):
        raise TrainingError(f"training diverged ({desc}: loss {mean}); lower --lr")
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, ctx: DistContext) -> float:
    """Top-1 accuracy in percent over all of ``x`` (each rank scores its shard)."""
    model.to(ctx.device).eval()
    idx = ctx.shard(len(x))
    correct = torch.zeros(2, dtype=torch.int64, device=ctx.device)
    for xb, yb in zip(iter_batches(x[idx], batch_size), iter_batches(y[idx], batch_size)):
        pred = model(xb.to(ctx.device)).argmax(dim=1)
        correct += torch.stack([(pred == yb.to(ctx.device)).sum(), torch.tensor(len(yb), device=ctx.device)])
    total = ctx.all_reduce_sum(correct)
    return 100.0 * int(total[0]) / max(int(total[1]), 1)


def measure(gm: fx.GraphModule, x: Tensor, batch_size: int, ctx: DistContext) -> EntropyReport:
    """Neuron-state counts of ``gm``'s sites over ``x`` (this rank's shard), summed over ranks."""
    gm.to(ctx.device).eval()
    return measure_entropy(gm, iter_batches(x[ctx.shard(len(x))], batch_size), reduce=ctx.all_reduce_sum)