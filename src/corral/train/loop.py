"""The training loop each worker runs for `Trainer.fit`.

The loop is strategy-agnostic: it builds the model and optimizer, restores a checkpoint if
there is one, has the strategy build this worker's `Replica`, and then only hands it
batches (``step``) and calls ``sync`` at the end of each epoch. Epoch metrics (training
and validation together) are summed over the epoch's workers in one ``meet`` call, so
every number in the history describes the whole epoch, not one worker's share of it.

Which workers share an epoch's data is the replica's answer from the previous ``meet``:
normally every rank, but after a lost worker only the survivors (and any worker that
joined), so from the next epoch on no sample is left out. The lowest of them leads: it
reports progress and writes checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from corral.data import Source
from corral.data.sharding import rank_range
from corral.errors import TrainingError
from corral.runtime import checkpoint as ckpt
from corral.runtime.context import Context, context
from corral.spec import TrainSettings
from corral.strategies import Batch, Replica, RoundReplica, RoundTotals, StrategyPlan
from corral.strategies.base import LossFn

#: Seconds between two progress reports from rank 0.
PROGRESS_EVERY_S = 0.5

ModelArg = torch.nn.Module | Callable[[], torch.nn.Module]
OptimizerFn = Callable[[Any], torch.optim.Optimizer]


@dataclass(kw_only=True)
class TrainTask:
    """Everything a worker needs to train; cloudpickled once and sent to every worker."""

    model: ModelArg
    loss: LossFn
    optimizer: OptimizerFn | None
    settings: TrainSettings
    #: The strategy's plan for this launch (its secrets reach the workers this way).
    plan: StrategyPlan
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
    """Loss, correct predictions and sample count of one worker's share of an epoch.

    The loss is already on the host (the step checked it), so it and the count add up as
    Python numbers. Only the correct count stays on the device, added to without a sync:
    three indexed float64 updates per step on a GPU cost about a fifth of a small model's
    step time (measured on an H100).
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum, self.count = 0.0, 0
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.classification = False

    def add(self, out: torch.Tensor, y: torch.Tensor, loss_value: float) -> None:
        n = len(y)
        self.loss_sum += loss_value * n
        self.count += n
        if _is_classification(out, y):
            self.classification = True
            self.correct += (out.argmax(dim=1) == y).sum()

    def add_round(self, totals: RoundTotals) -> None:
        """Add what a round replica trained (its clients' local steps)."""
        self.loss_sum += totals.loss_sum
        self.count += totals.count
        self.correct += totals.correct
        self.classification = self.classification or totals.classification

    @property
    def sums(self) -> torch.Tensor:
        """``[loss sum, correct, count]``, the vector workers add up at the epoch's end (on
        the device: NCCL reduces only GPU tensors)."""
        values = [self.loss_sum, float(self.correct.item()), float(self.count)]
        return torch.tensor(values, dtype=torch.float64, device=self.correct.device)

    def row(self, totals: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """Metrics from `totals`, the sums of every worker's `sums`."""
        loss_sum, correct, count = totals.tolist()
        row = {f"{prefix}loss": loss_sum / max(count, 1.0)}
        if self.classification:
            row[f"{prefix}accuracy"] = correct / max(count, 1.0)
        return row


@dataclass(frozen=True)
class _Share:
    """This worker's place among the workers of one epoch (sorted ranks; the first leads)."""

    rank: int
    members: list[int]

    @property
    def position(self) -> int:
        return self.members.index(self.rank)

    @property
    def leads(self) -> bool:
        return self.members[0] == self.rank


def _train_epoch(
    task: TrainTask, replica: Replica, epoch: int, share: _Share, ctx: Context
) -> tuple[_EpochSums, int]:
    """Train one epoch on this worker's share; returns its sums and communication rounds."""
    s = task.settings
    sums = _EpochSums(ctx.device)
    if isinstance(replica, RoundReplica):  # the round picks its own samples (clients)
        totals = replica.train_round(
            epoch, task.train, epochs=s.epochs, batch_size=s.batch_size, seed=s.seed
        )
        sums.add_round(totals)
        return sums, 1
    workers = len(share.members)
    steps = task.train.steps_per_epoch(workers, s.batch_size)
    lo, hi = rank_range(task.train.num_samples, share.position, workers)
    replica.begin_epoch(epoch, steps=steps, samples=hi - lo)
    start = last_report = time.monotonic()
    syncs, seen = 0, 0
    batches = task.train.batches(
        rank=share.position,
        world_size=workers,
        epoch=epoch,
        seed=s.seed,
        batch_size=s.batch_size,
        shuffle=s.shuffle,
    )
    for step, (x, y) in enumerate(batches):
        y = y.to(ctx.device)
        done = replica.step(Batch(x.to(ctx.device), y, epoch, step))
        syncs += done.synced
        sums.add(done.output, y, done.loss)
        seen += len(y)
        now = time.monotonic()
        if share.leads and now - last_report >= PROGRESS_EVERY_S:
            last_report = now
            ctx.report(
                kind="progress",
                epoch=epoch + 1,
                epochs=s.epochs,
                step=step + 1,
                steps=steps,
                loss=done.loss,
                samples_per_s=seen * workers / (now - start),
            )
    replica.sync()
    return sums, syncs


@torch.no_grad()
def _evaluate(task: TrainTask, model: torch.nn.Module, share: _Share, ctx: Context) -> _EpochSums:
    assert task.validation is not None
    model.eval()
    sums = _EpochSums(ctx.device)
    for x, y in task.validation.batches(
        rank=share.position,
        world_size=len(share.members),
        epoch=0,
        seed=0,
        batch_size=task.settings.batch_size,
        shuffle=False,
    ):
        x, y = x.to(ctx.device), y.to(ctx.device)
        out = model(x)
        sums.add(out, y, task.loss(out, y).item())
    model.train()
    return sums


def _epoch(
    task: TrainTask, replica: Replica, epoch: int, share: _Share, ctx: Context
) -> tuple[dict[str, float], list[int]]:
    """Train and evaluate one epoch; returns its history row and the next epoch's workers."""
    start = time.monotonic()
    train, syncs = _train_epoch(task, replica, epoch, share, ctx)
    parts = [train]
    if task.validation is not None:
        parts.append(_evaluate(task, replica.model, share, ctx))
    # One meeting of all workers per epoch; its wait for the slowest is part of the epoch.
    totals, members = replica.meet(epoch, torch.cat([p.sums for p in parts]))
    elapsed = time.monotonic() - start
    row = {"epoch": float(epoch + 1), **train.row(totals[:3])}
    row["samples"] = totals[2].item()
    row["samples_per_s"] = totals[2].item() / elapsed
    row["syncs"] = float(syncs)
    row["time_s"] = elapsed
    row["workers"] = float(len(share.members))
    if task.validation is not None:
        row.update(parts[1].row(totals[3:], prefix="val_"))
    return row, members


def _restore(task: TrainTask, ctx: Context) -> dict[str, Any] | None:
    """After a restart, this job's newest checkpoint; else the one resumed from, if any."""
    state = ctx.latest_checkpoint() if ctx.restart_count > 0 else None
    if state is None and task.resume_from is not None:
        state = {**ckpt.load(task.resume_from), "path": str(task.resume_from)}
    return state


def train_worker(task: TrainTask) -> dict[str, Any] | None:
    """Run on every worker; the last epoch's leader returns weights, history and checkpoint."""
    ctx = context()
    s = task.settings
    strategy = s.strategy
    if strategy.uses_process_group:
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    try:
        torch.manual_seed(s.seed)
        model = build_model(task.model).to(ctx.device)
        optimizer = task.optimizer(model.parameters()) if task.optimizer else None
        start_epoch, history, last = 0, [], None
        state = None if ctx.joining else _restore(task, ctx)
        if state is not None:
            model.load_state_dict(state["model"])
            if optimizer is not None:
                # the saved state brings its momentum buffers and its hyperparameters; the
                # optimizer this job asked for keeps its own (a run resumed with another
                # lr, a search's trial exploiting another's checkpoint, trains with it)
                asked = [
                    {k: v for k, v in group.items() if k != "params"}
                    for group in optimizer.param_groups
                ]
                optimizer.load_state_dict(state["optimizer"])
                for group, own in zip(optimizer.param_groups, asked, strict=True):
                    group.update(own)
            start_epoch, history, last = (
                state["data_position"]["epoch"],
                state["history"],
                state["path"],
            )
        replica = strategy.build(model, optimizer, task.loss, ctx, task.plan)
        if state is not None:
            replica.load_state_dict(state.get("strategy", {}))
            if ctx.rank == 0:
                # An epoch saved but not reported yet (the process died in between, or the
                # caller stopped the job on an earlier report) would otherwise never be;
                # the caller skips the epochs it has seen.
                for row in history:
                    ctx.report(kind="epoch", epochs=s.epochs, restored=True, **row)
        members = list(range(ctx.world_size))
        if ctx.joining:
            joined = replica.join()
            if joined is None:  # the job ended before this worker could start
                replica.close()
                return None
            start_epoch, members = joined
        for epoch in range(start_epoch, s.epochs):
            if replica.finished():  # a job resumed after its strategy had ended it
                break
            row, members = _epoch(task, replica, epoch, _Share(ctx.rank, members), ctx)
            row.update(replica.metrics())
            history.append(row)
            last_epoch = epoch + 1 == s.epochs or replica.finished()
            # saved before it is reported: a caller that stops the job on an epoch's report
            # (the service preempting it) loses nothing
            if (epoch + 1) % s.checkpoint.every == 0 or last_epoch:
                saved = ctx.checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict() if optimizer else {},
                        "strategy": replica.state_dict(),
                        "data_position": {"epoch": epoch + 1, "seed": s.seed},
                        "history": history,
                    },
                    index=epoch + 1,
                    writer=members[0],
                )
                last = str(saved) if saved else last
            if _Share(ctx.rank, members).leads:  # the lowest worker still alive leads
                ctx.report(kind="epoch", epochs=s.epochs, **row)
            if replica.finished():
                break
        replica.close()
        if not _Share(ctx.rank, members).leads:
            return None
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {"state_dict": weights, "history": history, "checkpoint": last}
    finally:
        if strategy.uses_process_group:
            dist.destroy_process_group()
