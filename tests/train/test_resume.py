"""Resuming and restarting restore the training state, not only the epoch count.

A run that silently started over would also end with epochs 1 to 4 in its history. So
these tests compare parameters with a run that was never interrupted (AllReduce, a fixed
seed, SGD with momentum, whose buffers must come back too) and count the epochs reported
through `on_report`: a restored run trains and reports only the epochs not done yet.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DieOnceLoss, blobs

import corral
from corral.data import as_source

pytestmark = pytest.mark.slow

WORKERS, BATCH, EPOCHS = 2, 16, 4
#: Steps each worker takes per epoch.
STEPS = as_source(blobs()).steps_per_epoch(WORKERS, BATCH)


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def fit(checkpoints: Path, **kw) -> tuple[corral.Result, list[int]]:
    """Train on the blobs; returns the result and the epochs reported, in order."""
    reported: list[int] = []

    def on_report(msg) -> None:
        metrics = (msg.body or {}).get("metrics", {})
        if metrics.get("kind") == "epoch":
            reported.append(int(metrics["epoch"]))

    args = dict(
        model=small_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        strategy=corral.AllReduce(),
        workers=WORKERS,
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=3,
        checkpoint_dir=checkpoints,
    )
    result = corral.Trainer(**(args | kw)).fit(blobs(), on_report=on_report)
    return result, reported


def assert_same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    theirs_by_name = theirs.state_dict()
    for name, a in ours.state_dict().items():
        b = theirs_by_name[name]
        assert torch.allclose(a, b, rtol=0, atol=1e-6), f"{name} differs by {(a - b).abs().max()}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> corral.Result:
    """Four epochs, never interrupted."""
    result, reported = fit(tmp_path_factory.mktemp("straight"))
    assert reported == [1, 2, 3, 4]
    return result


def test_two_epochs_then_a_two_epoch_resume_equal_four_straight(tmp_path, straight):
    first, _ = fit(tmp_path / "first", epochs=2)
    resumed, reported = fit(tmp_path / "more", resume_from=first.checkpoint)
    assert reported == [3, 4]  # only the epochs not done yet were trained
    assert_same_parameters(resumed.model, straight.model)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]


class DieInEpochTwo(DieOnceLoss):
    """`DieOnceLoss`, armed from worker 1's second step of epoch 2: that step follows an
    all-reduce with worker 0, which had saved and reported epoch 1 before it, so the kill
    comes at a known step and after epoch 1's report, whatever the timing."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.steps <= STEPS + 1:
            return torch.nn.functional.cross_entropy(out, y)
        return super().__call__(out, y)


def test_after_a_sigkill_and_a_restart_each_epoch_is_reported_once_and_nothing_is_lost(
    tmp_path, caplog, straight
):
    result, reported = fit(tmp_path, loss=DieInEpochTwo(), max_restarts=1)
    assert "worker 1 failed (was killed by SIGKILL); restarting" in caplog.text
    assert reported == [1, 2, 3, 4]  # epoch 1 by the first attempt, 2 to 4 by the second
    assert_same_parameters(result.model, straight.model)
