"""A strategy written outside corral, as README's "Writing a strategy" walks through:
one class for the config, one for the replica, passed to `Trainer` as it is."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.distributed as dist

import corral
from corral.spec import parse
from corral.strategies import DataParallel, StrategyPlan

pytestmark = pytest.mark.slow


class HandAveraged(corral.Strategy):
    """Synchronous SGD written by hand: average the gradients, then step."""

    kind: Literal["hand-averaged"] = "hand-averaged"

    def build(self, model, optimizer, loss, ctx, plan: StrategyPlan) -> _Replica:
        return _Replica(model, optimizer, loss, ctx)


class _Replica(DataParallel):
    def update(self, loss: torch.Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        self.optimizer.step()
        return True

    def metrics(self) -> dict[str, Any]:
        return {"hand_made": 1.0}


def test_a_strategy_written_outside_corral_trains_like_allreduce():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)

    def fit(strategy: corral.Strategy) -> corral.Result:
        return corral.Trainer(
            model=lambda: torch.nn.Linear(4, 2),
            loss=torch.nn.CrossEntropyLoss(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
            strategy=strategy,
            workers=2,
            epochs=2,
            batch_size=16,
        ).fit((x, y), on_report=None)

    ours, reference = fit(HandAveraged()), fit(corral.AllReduce())
    assert ours.history[-1]["hand_made"] == 1.0  # our replica ran, not a built-in one
    for a, b in zip(ours.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)  # and it is the same maths as AllReduce


def test_yaml_names_only_the_strategies_of_the_union():
    with pytest.raises(corral.SpecError, match="unknown strategy 'hand-averaged'"):
        parse(corral.TrainSettings, {"strategy": {"kind": "hand-averaged"}})
