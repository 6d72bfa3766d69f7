"""Proof of the parameter server and gossip on real data: scikit-learn's digits, 4 workers.

Thresholds come from issue 3: sync and ssp ≥ 96.5% test accuracy; async with staleness
scaling, softsync and gossip ≥ 95%. A negative control shows why staleness scaling exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import corral

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from digits import load_data, make_model

pytestmark = pytest.mark.slow

SERVER_SGD = {"lr": 0.05, "momentum": 0.9}


def accuracy_of(strategy, checkpoints: Path, *, workers: int = 4, epochs: int = 40) -> float:
    x_train, x_test, y_train, y_test = load_data()
    result = corral.Trainer(
        model=make_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        strategy=strategy,
        workers=workers,
        epochs=epochs,
        batch_size=32,
        checkpoint_dir=checkpoints,
    ).fit((x_train, y_train), on_report=None)
    with torch.no_grad():
        predicted = result.model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return float((predicted == y_test).mean())


@pytest.mark.parametrize(
    ("strategy", "at_least", "epochs"),
    [
        (corral.ParameterServer(mode="sync", servers=2, optimizer_args=SERVER_SGD), 0.965, 40),
        (
            # ssp applies momentum per gradient, so 4 pushes decay it 4 times a round:
            # 0.974 per push is sync's 0.9 per round (0.974**4 ≈ 0.9)
            corral.ParameterServer(
                mode="ssp",
                servers=2,
                staleness=3,
                optimizer_args={"lr": 0.05, "momentum": 0.974},
            ),
            0.965,
            # 60 epochs gave 96.2-97.1% over six runs (0.965 is 435 of 450): a flake;
            # 90 gave 97.1-97.3%
            90,
        ),
        (
            corral.ParameterServer(
                mode="async", servers=2, lr_scaling="staleness", optimizer_args=SERVER_SGD
            ),
            0.95,
            40,
        ),
        (
            corral.ParameterServer(
                mode="softsync",
                servers=2,
                quorum=2,
                lr_scaling="staleness",
                optimizer_args=SERVER_SGD,
            ),
            0.95,
            40,
        ),
        (corral.Gossip(peers=1), 0.95, 40),
    ],
    ids=["sync", "ssp", "async", "softsync", "gossip"],
)
def test_digits_accuracy_with_four_workers(tmp_path, strategy, at_least, epochs):
    accuracy = accuracy_of(strategy, tmp_path, epochs=epochs)
    print(f"accuracy {accuracy:.4f}")
    assert accuracy >= at_least


def test_staleness_scaling_rescues_async_at_a_rate_that_diverges_without_it(tmp_path):
    """8 async workers, plain SGD at lr 0.7: each worker's gradient lands as a full step on
    values ~6 versions old, and training falls apart (10–30% test accuracy, seen under
    loads from 2 to 13 on 2 cores); dividing each rate by its staleness trains (~88% after 5
    epochs, once only 55%: 10 epochs give it room, 94% in the last run)."""

    def run(lr_scaling):
        ps = corral.ParameterServer(
            mode="async", servers=1, lr_scaling=lr_scaling, optimizer_args={"lr": 0.7}
        )
        return accuracy_of(ps, tmp_path / str(lr_scaling), workers=8, epochs=10)

    assert run(None) < 0.5
    assert run("staleness") > 0.75
