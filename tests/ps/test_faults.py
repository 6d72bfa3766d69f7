"""Faults on real processes: a worker SIGKILLed mid-epoch, a successor joining, sync failing.

The victim kills itself with SIGKILL while computing the loss of a chosen step, so where it
dies is exact (it has pushed exactly the steps before) and nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import blobs

import corral
from corral.data import as_source
from corral.errors import WorkerError

pytestmark = pytest.mark.slow

WORKERS, BATCH, SAMPLES = 3, 16, 400
#: The victim dies computing the loss of this step (0-based) of epoch 2.
DEATH_STEP = 4


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def steps_per_epoch(workers: int) -> int:
    return as_source(blobs(SAMPLES)).steps_per_epoch(workers, BATCH)


class KillLoss(torch.nn.Module):
    """Cross-entropy that SIGKILLs worker `victim` at step `DEATH_STEP` of epoch 2 (of the
    first attempt), and writes the first loss each worker computes to `log_dir/<rank>.json`."""

    def __init__(self, victim: int, log_dir: Path) -> None:
        super().__init__()
        self.victim, self.log_dir, self.calls = victim, str(log_dir), 0

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = corral.context()
        loss = torch.nn.functional.cross_entropy(out, y)
        if self.calls == 0:
            first = {"loss": loss.item(), "joining": ctx.joining}
            Path(self.log_dir, f"{ctx.rank}.json").write_text(json.dumps(first))
        if not torch.is_grad_enabled():
            return loss  # validation: not a training step
        death = steps_per_epoch(WORKERS) + DEATH_STEP
        if ctx.rank == self.victim and ctx.restart_count == 0 and self.calls == death:
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls += 1
        return loss


def fit(strategy: corral.ParameterServer, tmp_path: Path, victim: int, **kw) -> corral.Result:
    logs = tmp_path / "first-loss"
    logs.mkdir()
    trainer = corral.Trainer(
        model=model,
        loss=KillLoss(victim, logs),
        strategy=strategy,
        workers=WORKERS,
        epochs=4,
        batch_size=BATCH,
        checkpoint_dir=tmp_path / "checkpoints",
        **kw,
    )
    x, y = blobs(SAMPLES)
    return trainer.fit((x, y), validation=blobs(200, seed=1), on_report=None)


def untrained_share(victim: int) -> int:
    """Samples of the victim's share of epoch 2 after the batches it pushed."""
    batches = as_source(blobs(SAMPLES)).batches(
        rank=victim, world_size=WORKERS, epoch=1, seed=0, batch_size=BATCH
    )
    return sum(len(y) for _, y in list(batches)[DEATH_STEP:])


@pytest.mark.parametrize(
    ("strategy", "victim"),
    [
        (corral.ParameterServer(mode="async", servers=2, lr_scaling="staleness"), 1),
        (corral.ParameterServer(mode="async", servers=1, optimizer_args={"lr": 0.1}), 0),
        (corral.ParameterServer(mode="ssp", servers=2, staleness=1), 2),
        (corral.ParameterServer(mode="softsync", servers=1, quorum=2), 1),
    ],
    ids=["async", "async-rank0", "ssp", "softsync"],
)
def test_training_goes_on_without_a_killed_worker(tmp_path, caplog, strategy, victim):
    result = fit(strategy, tmp_path, victim)
    (lost,) = result.lost_workers
    assert lost == {
        "rank": victim,
        "cause": "was killed by SIGKILL",
        "epoch": 2,
        "steps_done": DEATH_STEP,
        "steps": steps_per_epoch(WORKERS),
        "samples_not_trained": untrained_share(victim),
        "replaced_by": None,
    }
    assert f"worker {victim} was killed by SIGKILL in epoch 2 after {DEATH_STEP} of" in caplog.text
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert [r["workers"] for r in result.history] == [3, 3, 2, 2]
    # epoch 2 counts the survivors' shares; from epoch 3 they share all the data
    survivors = [r for r in range(WORKERS) if r != victim]
    shares = as_source(blobs(SAMPLES))
    survivor_samples = sum(
        len(y)
        for r in survivors
        for _, y in shares.batches(rank=r, world_size=WORKERS, epoch=1, seed=0, batch_size=BATCH)
    )
    assert result.history[1]["samples"] == survivor_samples
    assert result.history[2]["samples"] == result.history[3]["samples"] == SAMPLES
    assert result.metrics["val_accuracy"] > 0.9
    assert (tmp_path / "checkpoints" / "checkpoint-000004.pt").exists()


def test_a_successor_joins_from_the_current_parameters(tmp_path, caplog):
    strategy = corral.ParameterServer(mode="async", servers=2, optimizer_args={"lr": 0.1})
    result = fit(strategy, tmp_path, victim=1, max_restarts=1)
    (lost,) = result.lost_workers
    assert lost["replaced_by"] == WORKERS and lost["epoch"] == 2
    assert "worker 3 joins in its place" in caplog.text
    assert [r["workers"] for r in result.history] == [3, 3, 3, 3]
    assert [r["samples"] for r in result.history[2:]] == [SAMPLES, SAMPLES]
    first = {int(p.stem): json.loads(p.read_text()) for p in (tmp_path / "first-loss").iterdir()}
    assert first[WORKERS]["joining"] and not first[0]["joining"]
    # it starts from the servers' trained values, not from a fresh model
    assert first[WORKERS]["loss"] < 0.5 * first[0]["loss"]
    assert result.metrics["val_accuracy"] > 0.9


def test_sync_fails_cleanly_when_a_worker_dies(tmp_path):
    strategy = corral.ParameterServer(mode="sync", servers=2)
    with pytest.raises(WorkerError, match="worker 1 was killed by SIGKILL"):
        fit(strategy, tmp_path, victim=1)


def test_sync_restarts_from_the_checkpoint_when_allowed(tmp_path, caplog):
    strategy = corral.ParameterServer(mode="sync", servers=2)
    result = fit(strategy, tmp_path, victim=1, max_restarts=1)
    assert "worker 1 failed (was killed by SIGKILL); restarting" in caplog.text
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.lost_workers == []
