"""The interface every synchronisation strategy implements.

A strategy is typed configuration (a pydantic model, so the same object is written in
Python, YAML and REST) plus three verbs the training loop calls in a fixed order:

1. ``setup(model, optimizer, ctx)`` once, after the model and optimizer exist, returning
   the module to call forward on (for example a ``DistributedDataParallel`` wrapper);
2. ``step(loss)`` once per mini-batch: backward, optimizer step and whatever communication
   the algorithm needs, returning a `StepResult`;
3. ``finish_epoch()`` at the end of every epoch, so that evaluation and checkpoints see
   one model on every rank, then ``epoch_metrics()`` for what the strategy measured;
4. ``finish()`` once, when training is over.

Around every epoch the loop also calls ``begin_epoch`` (this worker's share) and
``epoch_end``, which sums the epoch's metrics over the workers — by default with one
all-reduce; a strategy without a process group does it through its own servers — and
says which workers train the next epoch.

Before anything starts, ``prepare_job`` runs once per launch on the caller's side: a
strategy generates its job's keys there and returns the processes it needs beside the
workers (parameter servers). A strategy that can train on without a lost worker says so
in ``tolerates_worker_loss``; the launcher then calls ``worker_lost`` (caller side) for
each loss, and a worker started in a lost one's place calls ``join`` before its first
epoch.

`Trainer` never branches on the strategy's name; a new algorithm is a new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from corral.engines.base import Resources
from corral.train.context import Context
from corral.train.roles import Role


@dataclass(frozen=True)
class StepResult:
    """What one step did that the loop reports: whether replicas communicated."""

    synced: bool


class Strategy(BaseModel, ABC):
    """Base of all strategies; subclasses add a ``kind`` literal and their settings."""

    model_config = ConfigDict(extra="forbid")

    #: Whether workers run the user's optimizer (a parameter server runs its own).
    needs_optimizer: ClassVar[bool] = True
    #: Whether the loop opens a torch.distributed process group (collectives, DDP).
    uses_process_group: ClassVar[bool] = True

    def tolerates_worker_loss(self) -> bool:
        """Whether training goes on, without it or with a successor, when a worker dies."""
        return False

    def worker_lost(self, rank: int, successor: int | None, store: dist.Store) -> dict[str, Any]:
        """Caller side: release whoever waits for dead `rank`, expect its `successor` (a
        worker already started in its place, if any); return what it left undone."""
        raise NotImplementedError(f"the {type(self).__name__} strategy cannot lose workers")

    def prepare_job(self, *, workers: int, resources: Resources) -> list[Role]:
        """Per-launch preparation on the caller's side; returns processes to start too."""
        return []

    @abstractmethod
    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context
    ) -> torch.nn.Module:
        """Prepare replicas to agree; returns the module the loop calls forward on."""

    @abstractmethod
    def step(self, loss: torch.Tensor) -> StepResult:
        """Backpropagate `loss`, update parameters and synchronise as the algorithm says."""

    def helper_restarted(self, role: str, rank: int, lost: list[int], store: dist.Store) -> None:
        """Caller side: a restartable helper was started again; `lost` are the workers this
        attempt lost so far, which a helper restored from an older state may still await."""

    def join(self) -> tuple[int, list[int]] | None:
        """For a worker joining a running job: the epoch it starts at and that epoch's
        workers, once it may start; ``None`` if the job finished meanwhile."""
        raise NotImplementedError(f"the {type(self).__name__} strategy cannot add workers")

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        """This worker is about to train `samples` samples of `epoch` in `steps` steps."""

    def epoch_end(self, epoch: int, sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Sum `sums` over this epoch's workers; return it and the next epoch's workers.

        Every worker calls this once per epoch with a tensor of the same length, so it is
        also the point where all workers of an epoch meet.
        """
        dist.all_reduce(sums)
        return sums, list(range(dist.get_world_size()))

    def finish_epoch(self) -> None:
        """Bring replicas to one model at the end of an epoch (no-op if always in sync)."""

    def epoch_metrics(self) -> dict[str, Any]:
        """What the strategy measured this epoch, merged into the history row."""
        return {}

    def finish(self) -> None:
        """Release what `setup` acquired; called once after the last epoch."""
