"""Strategies on real gloo process groups: replicas end up identical, maths is right."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import corral
from corral.runtime.context import context
from corral.strategies import Batch, StrategyPlan
from corral.strategies.averaging import average_, broadcast_

pytestmark = pytest.mark.slow


def average_ranks() -> list[float]:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tensors = [torch.full((3,), float(rank)), torch.tensor([[rank * 2.0]])]
    average_(tensors)
    same = [torch.tensor([float(rank)])]
    broadcast_(same, src=2)
    return [tensors[0][0].item(), tensors[1].item(), same[0].item()]


def test_average_and_broadcast_are_exact():
    # ranks 0..3: mean of r is 1.5, mean of 2r is 3.0; broadcast from rank 2 gives 2.0
    assert corral.run(average_ranks, workers=4) == [1.5, 3.0, 2.0]


def train_and_gather(
    strategy: corral.Strategy, steps: int, finish: bool = True
) -> list[torch.Tensor]:
    """A few steps on rank-specific data; returns every rank's flattened parameters."""
    dist.init_process_group("gloo")
    ctx = context()
    torch.manual_seed(100 + ctx.rank)  # deliberately different initial weights per rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy
    replica = strategy.build(model, opt, loss, ctx, StrategyPlan())
    for step in range(steps):
        x = torch.randn(8, 6)
        replica.step(Batch(x, (x[:, 0] > 0).long(), epoch=0, index=step))
    if finish:
        replica.sync()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, flat)
    return gathered


@pytest.mark.parametrize(
    "strategy",
    [
        corral.AllReduce(),
        corral.AllReduce(compression="fp16"),
        corral.AllReduce(compression="powersgd", powersgd_warmup=2),
        corral.Averaging(every=3),
    ],
    ids=["allreduce", "fp16", "powersgd", "averaging"],
)
def test_replicas_agree_after_training(strategy):
    params = corral.run(train_and_gather, strategy, 7, workers=2)
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_averaging_lets_replicas_drift_between_syncs():
    # every=100 with 7 steps and no end of epoch: no sync yet, so replicas differ
    params = corral.run(train_and_gather, corral.Averaging(every=100), 7, False, workers=2)
    assert not torch.allclose(params[0], params[1], atol=1e-3)


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="compression"):
        corral.AllReduce(compression="zip")
