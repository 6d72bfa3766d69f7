"""Faults on real processes: a worker SIGKILLed mid-epoch, a successor joining, sync failing.

The victim kills itself with SIGKILL while computing the loss of a chosen step, so where it
dies is exact (it has pushed exactly the steps before) and nothing depends on timing.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import blobs, server_pid

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


def fit(strategy: corral.Strategy, tmp_path: Path, victim: int, **kw) -> corral.Result:
    logs = tmp_path / "first-loss"
    logs.mkdir()
    if strategy.needs_optimizer:  # gossip: the workers' own (servers bring theirs)
        kw.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9))
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
        (corral.Gossip(peers=1), 1),  # membership on the driver, not on a server
        (corral.Gossip(peers=2), 0),
    ],
    ids=["async", "async-rank0", "ssp", "softsync", "gossip", "gossip-rank0"],
)
def test_training_goes_on_without_a_killed_worker(tmp_path, caplog, strategy, victim):
    result = fit(strategy, tmp_path, victim)
    (lost,) = result.lost_workers
    assert lost == {
        "rank": victim,
        "attempt": 0,
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


@pytest.mark.parametrize(
    "strategy",
    [corral.ParameterServer(mode="async", servers=2, optimizer_args={"lr": 0.1}), corral.Gossip()],
    ids=["ps-async", "gossip"],
)
def test_a_successor_joins_from_the_current_parameters(tmp_path, caplog, strategy):
    result = fit(strategy, tmp_path, victim=1, max_restarts=1)
    (lost,) = result.lost_workers
    assert lost["replaced_by"] == WORKERS and lost["epoch"] == 2
    assert "worker 3 joins in its place" in caplog.text
    assert [r["workers"] for r in result.history] == [3, 3, 3, 3]
    assert [r["samples"] for r in result.history[2:]] == [SAMPLES, SAMPLES]
    first = {int(p.stem): json.loads(p.read_text()) for p in (tmp_path / "first-loss").iterdir()}
    assert first[WORKERS]["joining"] and not first[0]["joining"]
    # it starts from the job's current values (the servers', or a member's), not from a
    # fresh model: its first batch's loss is below epoch 2's mean, a fresh one's above
    assert first[WORKERS]["loss"] < result.history[1]["loss"] < first[0]["loss"]
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


class KillServerLoss(torch.nn.Module):
    """Cross-entropy with which worker 0 SIGKILLs server `victim` at step `DEATH_STEP` of
    epoch 2; with `hold_port`, it then keeps the dead server's port bound."""

    def __init__(self, victim: int, hold_port: bool = False) -> None:
        super().__init__()
        self.victim, self.hold_port, self.calls = victim, hold_port, 0
        self.held: list[socket.socket] = []

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and corral.context().rank == 0:
            if self.calls == steps_per_epoch(WORKERS) + DEATH_STEP:
                pid = server_pid(self.victim)
                port = listening_port(pid)
                os.kill(pid, signal.SIGKILL)
                if self.hold_port:
                    self.held.append(bind_when_free(port))
            self.calls += 1
        return torch.nn.functional.cross_entropy(out, y)


def listening_port(pid: int) -> int:
    """The TCP port `pid` listens on (its ZeroMQ ROUTER), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing: the server is busy, not gone
            continue
        if target.startswith("socket:"):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            return int(fields[1].split(":")[1], 16)
    raise LookupError(f"process {pid} listens on no TCP port")


def bind_when_free(port: int) -> socket.socket:
    """Bind 127.0.0.1:`port` as soon as the killed process has released it (its old
    connections linger in TIME_WAIT, hence SO_REUSEADDR, which ZeroMQ sets too)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            if time.monotonic() > deadline:
                raise
            continue
        sock.listen()
        return sock


def fit_killing_server(tmp_path: Path, strategy: corral.ParameterServer, **kw) -> corral.Result:
    trainer = corral.Trainer(
        model=model,
        strategy=strategy,
        workers=WORKERS,
        epochs=4,
        batch_size=BATCH,
        checkpoint_dir=tmp_path,
        **kw,
    )
    return trainer.fit(blobs(SAMPLES), validation=blobs(200, seed=1), on_report=None)


#: Updates a shard applies in an epoch: one per push (async), one per round (sync).
UPDATES_PER_EPOCH = {"async": WORKERS * steps_per_epoch(WORKERS), "sync": steps_per_epoch(WORKERS)}


@pytest.mark.parametrize(
    ("mode", "lost_at_least", "lost_at_most"),
    [
        # any worker may have pushed up to its whole share of epoch 2 before the kill
        ("async", DEATH_STEP, DEATH_STEP + (WORKERS - 1) * steps_per_epoch(WORKERS)),
        ("sync", DEATH_STEP, DEATH_STEP),  # rounds wait for worker 0: exactly its pushes
    ],
    ids=["async", "sync"],
)
def test_a_killed_server_restarts_from_its_checkpoint(
    tmp_path, caplog, capfd, mode, lost_at_least, lost_at_most
):
    """The shard saves once, when epoch 1 is complete (every worker met at its end, so the
    count is exact whatever the timing), and is killed after worker 0's `DEATH_STEP`
    pushes of epoch 2, before a second save: those updates are lost, and counted."""
    every = UPDATES_PER_EPOCH[mode]
    strategy = corral.ParameterServer(mode=mode, servers=2, checkpoint_every=every)
    result = fit_killing_server(tmp_path, strategy, loss=KillServerLoss(1), max_restarts=1)
    assert "server 1 was killed by SIGKILL; server 1 restarts and restores its state" in (
        caplog.text
    )
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert [r["samples"] for r in result.history] == [SAMPLES] * 4
    # what the shard applied after its last checkpoint is gone, and said so
    assert lost_at_least <= result.metrics["server_lost_updates"] <= lost_at_most
    assert f"restored from checkpoint-{every:06d}.pt: update {every}," in capfd.readouterr().err
    assert result.metrics["val_accuracy"] > 0.9
    assert list((tmp_path / "servers" / "shard-1").glob("checkpoint-*.pt"))


def test_a_killed_server_without_checkpoints_fails_the_job(tmp_path):
    strategy = corral.ParameterServer(mode="async", servers=2)
    with pytest.raises(WorkerError, match="server 1 was killed by SIGKILL"):
        fit_killing_server(tmp_path, strategy, loss=KillServerLoss(1), max_restarts=1)


def test_a_server_that_cannot_bind_its_port_again_says_so(tmp_path):
    strategy = corral.ParameterServer(mode="async", servers=2, checkpoint_every=5)
    loss = KillServerLoss(1, hold_port=True)
    with pytest.raises(WorkerError, match=r"server 1 cannot bind its port 127\.0\.0\.1:\d+"):
        fit_killing_server(tmp_path, strategy, loss=loss, max_restarts=1)
