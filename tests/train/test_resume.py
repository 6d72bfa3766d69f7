"""Resuming and restarting restore the training state, not only the epoch count.

A run that silently started over would also end with epochs 1 to 4 in its history, and
with a fixed seed even with the same parameters. So these tests count the steps each
attempt trains, compare parameters with a run that was never interrupted (AllReduce, a
fixed seed, SGD with momentum, whose buffers must come back too), and count the epochs
reported through `on_report`.
"""

from __future__ import annotations

from collections.abc import Callable
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


class CountSteps:
    """`loss`, counting worker 0's training steps of each attempt in `folder`."""

    def __init__(self, folder: Path, loss: Callable[..., torch.Tensor]) -> None:
        folder.mkdir(parents=True)
        self.folder, self.loss, self.steps = str(folder), loss, 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = corral.context()
        if ctx.rank == 0:
            self.steps += 1
            Path(self.folder, str(ctx.restart_count)).write_text(str(self.steps))
        return self.loss(out, y)

    def counts(self) -> dict[int, int]:
        """Steps worker 0 trained, by attempt."""
        return {int(p.name): int(p.read_text()) for p in Path(self.folder).iterdir()}


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def fit(folder: Path, loss: Callable[..., torch.Tensor] | None = None, **kw):
    """Train on the blobs, checkpoints in `folder`; returns the result, the epochs
    reported in order, and worker 0's steps by attempt."""
    reported: list[int] = []

    def on_report(msg) -> None:
        metrics = (msg.body or {}).get("metrics", {})
        if metrics.get("kind") == "epoch":
            reported.append(int(metrics["epoch"]))

    counter = CountSteps(folder / "steps", loss or torch.nn.functional.cross_entropy)
    args = dict(
        model=small_model,
        loss=counter,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        strategy=corral.AllReduce(),
        workers=WORKERS,
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=3,
        checkpoint_dir=folder / "checkpoints",
    )
    result = corral.Trainer(**(args | kw)).fit(blobs(), on_report=on_report)
    return result, reported, counter.counts()


def assert_same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    theirs_by_name = theirs.state_dict()
    for name, a in ours.state_dict().items():
        b = theirs_by_name[name]
        assert torch.allclose(a, b, rtol=0, atol=1e-6), f"{name} differs by {(a - b).abs().max()}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> corral.Result:
    """Four epochs, never interrupted."""
    result, reported, steps = fit(tmp_path_factory.mktemp("straight"))
    assert reported == [1, 2, 3, 4] and steps == {0: EPOCHS * STEPS}
    return result


def test_two_epochs_then_a_two_epoch_resume_equal_four_straight(tmp_path, straight):
    first, _, _ = fit(tmp_path / "first", epochs=2)
    resumed, _, steps = fit(tmp_path / "more", resume_from=first.checkpoint)
    assert steps == {0: 2 * STEPS}  # only epochs 3 and 4 were trained
    assert_same_parameters(resumed.model, straight.model)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]


def test_after_a_sigkill_and_a_restart_each_epoch_is_reported_once_and_nothing_is_lost(
    tmp_path, caplog, straight
):
    """`DieOnceLoss` kills worker 1 in epoch 2, as soon as epoch 1's checkpoint exists
    (perhaps before worker 0 reported that epoch): the second attempt trains epochs 2 to 4
    from that checkpoint, and the caller still hears of each epoch once."""
    result, reported, steps = fit(tmp_path, loss=DieOnceLoss(), max_restarts=1)
    assert "worker 1 failed (was killed by SIGKILL); restarting" in caplog.text
    assert reported == [1, 2, 3, 4]
    assert steps[1] == (EPOCHS - 1) * STEPS  # the restart did not train epoch 1 again
    assert_same_parameters(result.model, straight.model)


def test_a_powersgd_resume_restores_every_ranks_error_feedback(tmp_path):
    """PowerSGD defers what its low-rank step left out to the next step (error feedback,
    a different residual on each rank) and counts its warm-up steps: a resume that lost
    either would train differently from here on."""
    powersgd = corral.AllReduce(compression="powersgd", powersgd_rank=1, powersgd_warmup=2)
    straight, _, _ = fit(tmp_path / "straight", strategy=powersgd)
    first, _, _ = fit(tmp_path / "first", strategy=powersgd, epochs=2)
    ranks = torch.load(first.checkpoint, weights_only=True)["strategy"]["powersgd"]["ranks"]
    assert len(ranks) == WORKERS and ranks[0]["iter"] == 2 * STEPS  # steps so far
    assert not torch.equal(*(r["errors"]["0.weight"] for r in ranks))  # each rank's own
    resumed, _, _ = fit(tmp_path / "more", strategy=powersgd, resume_from=first.checkpoint)
    assert_same_parameters(resumed.model, straight.model)


def test_a_run_resumed_with_another_lr_trains_with_it(tmp_path):
    """The checkpoint's optimizer state brings momentum and the old lr: the new run's own
    lr wins (and the momentum buffers still come back, as the test above shows)."""
    first, _, _ = fit(tmp_path / "first", epochs=2)
    assert first.checkpoint is not None
    saved = torch.load(first.checkpoint, weights_only=True)["optimizer"]
    assert saved["param_groups"][0]["lr"] == 0.05
    zero, _, steps = fit(
        tmp_path / "zero",
        resume_from=first.checkpoint,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.0),
    )
    assert steps == {0: 2 * STEPS}  # epochs 3 and 4 were trained, with lr 0: no change
    assert_same_parameters(zero.model, first.model)
