"""Synchronous data parallelism with ring all-reduce (no parameter server).

Every step each worker computes gradients on its own mini-batch, the gradients are summed
with a ring all-reduce and averaged, and every replica applies the same update, so all
replicas stay identical — the bulk-synchronous scheme of Goyal et al., "Accurate, Large
Minibatch SGD: Training ImageNet in 1 Hour" (2017). We use PyTorch's
``DistributedDataParallel``, which buckets gradients and overlaps the all-reduce with the
backward pass (gloo on CPU, NCCL on GPU), instead of a hand-written ring.

Optional gradient compression uses DDP communication hooks: ``fp16`` halves the bytes
sent; ``powersgd`` sends a rank-r approximation with error feedback (Vogels et al.,
"PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization", 2019).

The effective batch is ``workers × batch_size``: scale the learning rate linearly with the
number of workers (and warm it up) as Goyal et al. recommend.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from corral.runtime.context import Context
from corral.strategies.base import DataParallel, LossFn, Strategy, StrategyPlan

#: What of PowerSGD's state a checkpoint keeps: the error feedback (what compression left
#: out so far, added back next step), the warm start of its low-rank factors, and the step.
_POWERSGD_STATE = ("error_dict", "p_memory_dict", "q_memory_dict", "iter")


class AllReduce(Strategy):
    """Synchronous all-reduce of gradients every step.

    Example:
        >>> corral.AllReduce(compression="fp16")
    """

    kind: Literal["allreduce"] = "allreduce"
    compression: Literal["fp16", "powersgd"] | None = None
    powersgd_rank: int = Field(2, ge=1, description="matrix rank PowerSGD approximates with")
    powersgd_warmup: int = Field(
        10, ge=2, description="steps of plain all-reduce before PowerSGD starts"
    )

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> _AllReduceReplica:
        assert optimizer is not None  # needs_optimizer: Trainer checked
        return _AllReduceReplica(self, model, optimizer, loss, ctx)


class _AllReduceReplica(DataParallel):
    def __init__(
        self,
        config: AllReduce,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        ctx: Context,
    ) -> None:
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.powersgd: powerSGD_hook.PowerSGDState | None = None
        if config.compression == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif config.compression == "powersgd":
            self.powersgd = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=config.powersgd_rank,
                start_powerSGD_iter=config.powersgd_warmup,
                min_compression_rate=1,
            )
            ddp.register_comm_hook(self.powersgd, powerSGD_hook.powerSGD_hook)
        super().__init__(model, optimizer, loss, ctx, net=ddp)

    def update(self, loss: torch.Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces gradients during backward
        self.optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        """PowerSGD's error feedback, every rank's (each holds its own): without it a
        resumed job loses what compression had deferred, and its steps after the restart
        differ from an unbroken run's. Collective: every rank calls it at the same step."""
        if self.powersgd is None:
            return {}
        mine = {k: _cpu(getattr(self.powersgd, k)) for k in _POWERSGD_STATE}
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return {"powersgd": every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("powersgd")
        if self.powersgd is None or not saved:
            return
        if len(saved) != dist.get_world_size():  # another world: its errors do not map
            return
        for key, value in saved[self.ctx.rank].items():
            setattr(self.powersgd, key, _to(value, self.ctx.device))


def _cpu(value: Any) -> Any:
    """`value` with every tensor copied to the host (dicts of bucket index → tensor)."""
    if isinstance(value, dict):
        return {k: v.detach().cpu() for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value
