"""Periodic model averaging ("local SGD"): step alone, average parameters every N batches.

Each worker runs its own optimizer on its own mini-batches; every ``every`` steps the
parameters (and buffers such as BatchNorm statistics) of all replicas are replaced by their
mean with one all-reduce. Communication drops by a factor of N against `AllReduce`, at the
price of replicas drifting apart between averages. This is iterative parameter mixing
(McDonald et al., "Distributed Training Strategies for the Structured Perceptron", 2010),
analysed as local SGD by Lin et al., "Don't Use Large Mini-Batches, Use Local SGD" (2020).

Choosing N: 10–20 works well for most models (the surveys corral grew from say the same);
larger N saves more bandwidth but drifts more, especially early in training and at high
learning rates. The learning rate is that of single-worker training at ``batch_size``:
unlike `AllReduce`, do not scale it with the number of workers. Optimizer state (momentum,
Adam moments) stays local to each worker and is not averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from corral.strategies.base import DataParallel, LossFn, Strategy, StrategyPlan

# torch is imported in the functions that run in workers: the spec reads `Averaging`
# without it.
if TYPE_CHECKING:
    import torch

    from corral.runtime.context import Context


def _state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and floating-point buffers: everything replicas must agree on."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [p.data for p in model.parameters()] + buffers


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over all ranks, with a single all-reduce."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for tensor, mean in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        tensor.copy_(mean)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make every rank hold rank `src`'s values, so replicas start from one model."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.broadcast(flat, src=src)
    for tensor, value in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        tensor.copy_(value)


class Averaging(Strategy):
    """Average parameters across workers every `every` mini-batches.

    Example:
        >>> corral.Averaging(every=16)
    """

    kind: Literal["averaging"] = "averaging"
    every: int = Field(16, ge=1, description="mini-batches between two averages")

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> _AveragingReplica:
        assert optimizer is not None  # needs_optimizer: Trainer checked
        return _AveragingReplica(self.every, model, optimizer, loss, ctx)


class _AveragingReplica(DataParallel):
    def __init__(
        self,
        every: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        ctx: Context,
    ) -> None:
        super().__init__(model, optimizer, loss, ctx)
        broadcast_(_state_tensors(model))
        self.every, self.since_sync = every, 0

    def update(self, loss: torch.Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.since_sync += 1
        if self.since_sync < self.every:
            return False
        self.sync()
        return True

    def sync(self) -> None:
        import torch

        if not self.since_sync:
            return
        with torch.no_grad():
            average_(_state_tensors(self.model))
        self.since_sync = 0
