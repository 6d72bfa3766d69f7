"""What every distribution strategy is: a frozen config, a caller-side plan, a Replica.

A strategy has three parts, each named after where it runs:

1. **Config** (`Strategy`, on both sides): frozen typed data, a member of the spec's
   tagged union, so the same object is written in Python, YAML and REST. Nothing mutates
   it.
2. **Plan** (`Strategy.plan`, on the caller): pure; returns a `StrategyPlan` with the
   helper processes the strategy needs beside the workers (parameter servers) and their
   resources, fresh secrets for this launch, and — for a strategy that trains on without
   a lost worker — a `Supervisor`, the caller-side object the launcher tells about losses.
   `Trainer`, the YAML path and the service's scheduler all read the same plan.
3. **Replica** (`Strategy.build`, in each worker): the runtime object, built from the
   model, the optimizer, the loss, the worker's `Context` and the plan. Its fields are
   never ``None``. Its step verb receives the *batch*, so a strategy may own forward,
   backward and communication (pipeline micro-batches, a federated client's local
   epochs). Data-parallel strategies subclass `DataParallel` and write only `update`.

The training loop calls, in each worker: ``begin_epoch`` (this worker's share), ``step``
per batch, ``sync`` at the end of the epoch (so evaluation and checkpoints see one model),
then ``meet`` (sums the epoch's metrics over its workers and says who trains the next
one), ``metrics``, and ``close`` once at the end. A worker that joins a running job
calls ``join`` first. ``state_dict``/``load_state_dict`` carry the replica's own state
(compression error feedback, say) through checkpoints.

`Trainer` never branches on a strategy's name: a new algorithm is one new module and one
line in `corral.strategies.AnyStrategy`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from corral.errors import TrainingError
from corral.runtime.resources import Resources
from corral.runtime.roles import Role

# torch is imported where replicas run, in their methods: the spec reads the configs
# in these modules without it (``corral train bad.yaml`` fails before torch loads).
if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from corral.comm.curve import JobKeys
    from corral.data import Source
    from corral.runtime.context import Context

LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Batch:
    """One mini-batch of a worker's share, and where it stands in the job."""

    x: torch.Tensor
    y: torch.Tensor
    epoch: int
    index: int


@dataclass(frozen=True)
class StepResult:
    """What one step did that the loop reports.

    Attributes:
        output: The model's output for the batch, detached (for accuracy).
        loss: The batch's loss as a number, already checked to be finite.
        synced: Whether replicas communicated in this step.
    """

    output: torch.Tensor
    loss: float
    synced: bool


class Supervisor(ABC):
    """Caller side, for strategies that train on without a lost process: the launcher
    calls it on its watching thread, with the job's rendezvous store."""

    @abstractmethod
    def worker_lost(self, rank: int, successor: int | None, store: dist.Store) -> dict[str, Any]:
        """Release whoever waits for dead `rank`, expect its `successor` (a worker already
        started in its place, if any); returns what the dead worker left undone:
        ``epoch``, ``steps_done``, ``steps``, ``samples_not_trained`` (empty if it had not
        started an epoch)."""

    def helper_restarted(  # noqa: B027
        self, role: str, rank: int, lost: list[int], store: dist.Store
    ) -> None:
        """A restartable helper was started again; `lost` are the workers this attempt
        lost so far, which a helper restored from an older state may still await."""


@dataclass(frozen=True, kw_only=True)
class StrategyPlan:
    """What a strategy needs for one launch, decided on the caller's side.

    Attributes:
        helpers: Processes to start beside the workers (parameter servers).
        keys: Fresh CURVE keys for the job's own sockets, if the strategy opens any.
        tolerates_worker_loss: Whether the job trains on, without it or with a
            successor, when a worker dies.
        supervisor: Whom the launcher tells about a lost worker or a restarted helper;
            required when either can happen.
        membership: Whether the driver hosts the job's membership for its workers
            (`corral.runtime.meetings`, authenticated with `keys`): how a strategy
            without a process group meets, and learns who trains (see
            `corral.strategies.members`).
    """

    helpers: tuple[Role, ...] = ()
    keys: JobKeys | None = field(default=None, repr=False)
    tolerates_worker_loss: bool = False
    supervisor: Supervisor | None = None
    membership: bool = False

    def __post_init__(self) -> None:
        restartable = any(r.restartable for r in self.helpers)
        if (self.tolerates_worker_loss or restartable) and self.supervisor is None:
            raise TypeError("a plan that absorbs lost processes needs a supervisor")
        if self.membership and self.keys is None:
            raise TypeError("a plan whose driver hosts membership needs the job's keys")


@dataclass(frozen=True)
class RoundTotals:
    """What a `RoundReplica` trained in one round, summed as the loop sums batches.

    Attributes:
        loss_sum: The local training loss summed over every sample of every local step.
        correct: Correct predictions among them (classification).
        count: Samples trained on, local epochs counted.
        classification: Whether the outputs were class scores.
    """

    loss_sum: float
    correct: int
    count: int
    classification: bool


class Replica(ABC):
    """One worker's side of a strategy; see the module docstring for the call order."""

    #: The model as the caller gave it (single-device); checkpoints and evaluation use it.
    model: torch.nn.Module

    @abstractmethod
    def step(self, batch: Batch) -> StepResult:
        """Train on one batch: forward, loss, backward, update and communication."""

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:  # noqa: B027
        """This worker is about to train `samples` samples of `epoch` in `steps` steps."""

    def sync(self) -> None:  # noqa: B027
        """Bring replicas to one model at the end of an epoch (no-op if always in sync)."""

    def meet(self, epoch: int, sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Sum `sums` over this epoch's workers; return it and the next epoch's workers.

        Every worker calls this once per epoch with a tensor of the same length, so it is
        also the point where all workers of an epoch meet.
        """
        import torch.distributed as dist

        dist.all_reduce(sums)
        return sums, list(range(dist.get_world_size()))

    def join(self) -> tuple[int, list[int]] | None:
        """For a worker joining a running job: the epoch it starts at and that epoch's
        workers, once it may start; ``None`` if the job finished meanwhile."""
        raise TrainingError(f"{type(self).__name__} cannot add workers to a running job")

    def finished(self) -> bool:
        """Whether training ends now though epochs remain (a spent privacy budget); the
        same answer on every worker, asked before each epoch and after it."""
        return False

    def metrics(self) -> dict[str, Any]:
        """What the strategy measured this epoch, merged into the history row."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The replica's own state for checkpoints (beside the model's and optimizer's)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what `state_dict` returned."""

    def close(self) -> None:  # noqa: B027
        """Release what the replica holds; called once after the last epoch."""


class RoundReplica(Replica):
    """A replica that trains whole rounds, not batches of this worker's share.

    A federated round samples clients, trains each from the global model on its own
    samples for several local epochs and aggregates their updates: which samples a worker
    visits is the round's choice, so the loop hands it the data and the epoch and lets it
    go (``train_round`` in place of ``begin_epoch`` and ``step``).
    """

    def step(self, batch: Batch) -> StepResult:
        raise TypeError(f"{type(self).__name__} trains whole rounds (train_round), not batches")

    @abstractmethod
    def train_round(
        self, epoch: int, data: Source, *, epochs: int, batch_size: int, seed: int
    ) -> RoundTotals:
        """Train round `epoch` (of `epochs`) on `data`, leave the aggregated model in
        ``model``, and return what was trained; every worker calls it once per epoch."""


def checked_loss(loss: torch.Tensor, batch: Batch, rank: int) -> float:
    """`loss` as a number; a loss that is not a finite scalar stops the job clearly."""
    import torch

    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TrainingError(f"the loss must return a scalar tensor, got {shape}")
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingError(
            f"the loss became {value} at epoch {batch.epoch + 1}, step {batch.index + 1} "
            f"on worker {rank}; lower the learning rate or look for bad values in the data"
        )
    return value


class DataParallel(Replica):
    """A replica that runs forward and the loss itself and leaves `update` to the strategy:
    the whole of a data-parallel strategy's worker side is usually that one method.

    Attributes:
        net: The module forward runs on (a ``DistributedDataParallel`` wrapper, say).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        ctx: Context,
        *,
        net: torch.nn.Module | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss, self.ctx = model, optimizer, loss, ctx
        self.net = net if net is not None else model

    def step(self, batch: Batch) -> StepResult:
        out = self.net(batch.x)
        loss = self.loss(out, batch.y)
        value = checked_loss(loss, batch, self.ctx.rank)
        synced = self.update(loss)
        return StepResult(output=out.detach(), loss=value, synced=synced)

    @abstractmethod
    def update(self, loss: torch.Tensor) -> bool:
        """Backpropagate `loss`, update the parameters and communicate as the algorithm
        says; returns whether replicas communicated."""


class Strategy(BaseModel, ABC):
    """Base of all strategy configs; subclasses add a ``kind`` literal and their settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The strategy's name in YAML and REST: each subclass narrows it to a literal.
    kind: str

    #: Whether workers run the user's optimizer (a parameter server runs its own).
    needs_optimizer: ClassVar[bool] = True
    #: Whether the loop opens a torch.distributed process group (collectives, DDP).
    uses_process_group: ClassVar[bool] = True

    def group_column(self) -> str | None:
        """A column of the training data this strategy reads beside the features and the
        label, never a feature (a federated simulation's client ids), so that `Trainer`
        and YAML jobs read it into the source's ``groups()``; None: no such column."""
        return None

    def check_data(self, train: Source, *, seed: int) -> None:
        """Caller side, before any worker starts: refuse training data this strategy
        cannot use, in one line (a federated partition that leaves a client empty);
        `seed` is the job's."""

    def plan(self, *, workers: int, helpers: Resources) -> StrategyPlan:
        """Caller side, pure: what this strategy needs for one launch of `workers`
        workers; `helpers` are the resources the spec gives each helper process."""
        return StrategyPlan()

    @abstractmethod
    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> Replica:
        """Worker side: the replica that trains `model` in this worker."""
