"""The training loop each worker runs for `Trainer.fit`.

The loop is strategy-agnostic: it builds the model and optimizer, restores a checkpoint if
there is one, hands both to the strategy's ``setup``, and then only calls ``step(loss)``
and ``finish_epoch()``. Epoch metrics are summed over all ranks with one small all-reduce,
so every number in the history describes the whole epoch, not rank 0's share of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from corral.data import Source
from corral.errors import TrainingError
from corral.spec import TrainSettings
from corral.train import checkpoint as ckpt
from corral.train.context import Context, context

#: Seconds between two progress reports from rank 0.
PROGRESS_EVERY_S = 0.5

ModelArg = torch.nn.Module | Callable[[], torch.nn.Module]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFn = Callable[[Any], torch.optim.Optimizer]


@dataclass(kw_only=True)
class TrainTask:
    """Everything a worker needs to train; cloudpickled once and sent to every worker."""

    model: ModelArg
    loss: LossFn
    optimizer: OptimizerFn | None
    settings: TrainSettings
    train: Source
    validation: Source | None
    resume_from: Path | None


def build_model(model: ModelArg) -> torch.nn.Module:
    """Call a model factory (or take a module as is) and check that a module came back."""
    built = model if isinstance(model, torch.nn.Module) else model()
    if not isinstance(built, torch.nn.Module):
        raise TrainingError(
            f"the model factory returned {type(built).__name__}, not a torch.nn.Module"
        )
    return built


def _is_classification(out: torch.Tensor, y: torch.Tensor) -> bool:
    return not y.is_floating_point() and out.ndim == 2 and out.shape[1] > 1


class _EpochSums:
    """Loss, correct predictions and sample count, summed locally then over all ranks."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.classification = False

    def add(self, out: torch.Tensor, y: torch.Tensor, loss_value: float) -> None:
        n = len(y)
        self.sums[0] += loss_value * n
        self.sums[2] += n
        if _is_classification(out, y):
            self.classification = True
            self.sums[1] += (out.argmax(dim=1) == y).sum()

    def total(self, prefix: str = "") -> dict[str, float]:
        dist.all_reduce(self.sums)
        loss_sum, correct, count = self.sums.tolist()
        row = {f"{prefix}loss": loss_sum / count}
        if self.classification:
            row[f"{prefix}accuracy"] = correct / count
        return row


def _loss_value(loss: torch.Tensor, *, epoch: int, step: int, ctx: Context) -> float:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TrainingError(f"the loss must return a scalar tensor, got {shape}")
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingError(
            f"the loss became {value} at epoch {epoch + 1}, step {step + 1} on worker "
            f"{ctx.rank}; lower the learning rate or look for bad values in the data"
        )
    return value


def _train_epoch(
    task: TrainTask, net: torch.nn.Module, epoch: int, ctx: Context
) -> dict[str, float]:
    s = task.settings
    sums = _EpochSums(ctx.device)
    steps = task.train.steps_per_epoch(ctx.world_size, s.batch_size)
    start = last_report = time.monotonic()
    syncs, seen = 0, 0
    batches = task.train.batches(
        rank=ctx.rank,
        world_size=ctx.world_size,
        epoch=epoch,
        seed=s.seed,
        batch_size=s.batch_size,
        shuffle=s.shuffle,
    )
    for step, (x, y) in enumerate(batches):
        x, y = x.to(ctx.device), y.to(ctx.device)
        out = net(x)
        loss = task.loss(out, y)
        value = _loss_value(loss, epoch=epoch, step=step, ctx=ctx)
        syncs += s.strategy.step(loss).synced
        sums.add(out.detach(), y, value)
        seen += len(y)
        now = time.monotonic()
        if ctx.rank == 0 and now - last_report >= PROGRESS_EVERY_S:
            last_report = now
            ctx.report(
                kind="progress",
                epoch=epoch + 1,
                epochs=s.epochs,
                step=step + 1,
                steps=steps,
                loss=value,
                samples_per_s=seen * ctx.world_size / (now - start),
            )
    s.strategy.finish_epoch()
    row = sums.total()  # the wait for the slowest worker belongs to the epoch's time
    elapsed = time.monotonic() - start
    row["samples_per_s"] = sums.sums[2].item() / elapsed
    row["syncs"] = float(syncs)
    row["time_s"] = elapsed
    return row


@torch.no_grad()
def _evaluate(task: TrainTask, model: torch.nn.Module, ctx: Context) -> dict[str, float]:
    assert task.validation is not None
    model.eval()
    sums = _EpochSums(ctx.device)
    for x, y in task.validation.batches(
        rank=ctx.rank,
        world_size=ctx.world_size,
        epoch=0,
        seed=0,
        batch_size=task.settings.batch_size,
        shuffle=False,
    ):
        x, y = x.to(ctx.device), y.to(ctx.device)
        out = model(x)
        sums.add(out, y, task.loss(out, y).item())
    model.train()
    return sums.total(prefix="val_")


def _restore(task: TrainTask, ctx: Context) -> dict[str, Any] | None:
    """After a restart, this job's newest checkpoint; else the one resumed from, if any."""
    state = ctx.latest_checkpoint() if ctx.restart_count > 0 else None
    if state is None and task.resume_from is not None:
        state = {**ckpt.load(task.resume_from), "path": str(task.resume_from)}
    return state


def train_worker(task: TrainTask) -> dict[str, Any] | None:
    """Run on every worker; rank 0 returns the trained weights, history and checkpoint."""
    ctx = context()
    s = task.settings
    dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    try:
        torch.manual_seed(s.seed)
        model = build_model(task.model).to(ctx.device)
        optimizer = task.optimizer(model.parameters()) if task.optimizer else None
        start_epoch, history, last = 0, [], None
        state = _restore(task, ctx)
        if state is not None:
            model.load_state_dict(state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, last = (
                state["data_position"]["epoch"],
                state["history"],
                state["path"],
            )
        net = s.strategy.setup(model, optimizer, ctx)
        for epoch in range(start_epoch, s.epochs):
            row = {"epoch": float(epoch + 1), **_train_epoch(task, net, epoch, ctx)}
            if task.validation is not None:
                row.update(_evaluate(task, model, ctx))
            row.update(s.strategy.epoch_metrics())
            history.append(row)
            if ctx.rank == 0:
                ctx.report(kind="epoch", epochs=s.epochs, **row)
            if (epoch + 1) % s.checkpoint.every == 0 or epoch + 1 == s.epochs:
                saved = ctx.checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict() if optimizer else {},
                        "data_position": {"epoch": epoch + 1, "seed": s.seed},
                        "history": history,
                    },
                    index=epoch + 1,
                )
                last = str(saved) if saved else last
        s.strategy.finish()
        if ctx.rank != 0:
            return None
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {"state_dict": weights, "history": history, "checkpoint": last}
    finally:
        dist.destroy_process_group()
