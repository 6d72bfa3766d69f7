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

Before anything starts, ``prepare_job`` runs once per launch on the caller's side: a
strategy generates its job's keys there and returns the processes it needs beside the
workers (parameter servers).

`Trainer` never branches on the strategy's name; a new algorithm is a new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
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

    def finish_epoch(self) -> None:
        """Bring replicas to one model at the end of an epoch (no-op if always in sync)."""

    def epoch_metrics(self) -> dict[str, Any]:
        """What the strategy measured this epoch, merged into the history row."""
        return {}

    def finish(self) -> None:
        """Release what `setup` acquired; called once after the last epoch."""
