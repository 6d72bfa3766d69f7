"""FedBuff, simulated on a pool of real worker processes.

The event simulation is checked, without processes, against a schedule worked by hand;
a job's model against a replay of that schedule done by hand (FedSGD: one full-batch
step per client, so sample order does not matter), once where every update is fresh
(FedAvg over the same clients) and once with stale and dropped ones, whose run is also
stopped and resumed; digits is checked to be learnt. Bad input is one line each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import corral
from corral.federated import IID, SecureAggregation
from corral.federated.privacy import Privacy
from corral.ps.consistency import staleness_weight
from corral.spec import TrainSettings, parse
from corral.strategies.fedbuff import Arrival, EventSimulation

RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 2)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _fit(strategy: corral.Strategy, *, epochs: int, lr: float = 0.5, **kwargs) -> corral.Result:
    return corral.Trainer(
        model=_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        strategy=strategy,
        workers=2,
        epochs=epochs,
        batch_size=1000,  # at least any client's data: one full-batch step each (FedSGD)
        **kwargs,
    ).fit((X, Y), on_report=None)


def _replay(config: corral.FedBuff, rounds: int, lr: float) -> tuple[torch.Tensor, list[list[int]]]:
    """The model after `rounds` server steps, by hand from the simulation's schedule:
    each buffered client takes one gradient step from the version it started from; the
    server adds Σ nᵢ·(1 + sᵢ)^-½·Δᵢ / Σ nᵢ. Also each step's stalenesses."""
    assert config.staleness == "sqrt"
    simulation = EventSimulation(config, seed=0)
    parts = IID().split(Y, clients=config.clients, seed=0)
    model, x, y = _model(), torch.from_numpy(X), torch.from_numpy(Y)
    past: dict[int, torch.Tensor] = {}
    stalenesses = []
    for _ in range(rounds):
        now = _flat(model)
        past[simulation.version] = now
        buffered = [a for a in simulation.next_step() if a.buffered]
        moved, total = torch.zeros_like(now), 0.0
        for a in buffered:
            torch.nn.utils.vector_to_parameters(past[a.version], model.parameters())
            rows = torch.from_numpy(parts[a.client])
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            moved += len(rows) * (1 + a.staleness) ** -0.5 * (-lr * grad)
            total += len(rows)
        torch.nn.utils.vector_to_parameters(now + moved / total, model.parameters())
        stalenesses.append([a.staleness for a in buffered])
    return _flat(model), stalenesses


def _schedule(config: corral.FedBuff, steps: int) -> list[list[Arrival]]:
    simulation = EventSimulation(config, seed=0)
    return [simulation.next_step() for _ in range(steps)]


def test_the_event_simulation_follows_a_schedule_worked_by_hand() -> None:
    # 3 clients in flight, K = 2, every run 1 long. t=1: runs 0, 1, 2 (from v0) end;
    # 0 and 1 fill the buffer (step 1); 2 is one step stale; the three slots refill from
    # v1 once the instant is over, and run 3 (v1) completes step 2 at t=2; 4 and 5 (v1)
    # arrive at version 2, stale 1 each (step 3). Then the pattern repeats from v3.
    config = corral.FedBuff(clients=10, buffer=2, concurrency=3, durations="constant")
    steps = _schedule(config, 6)
    assert [[a.run for a in s] for s in steps] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    versions = [[0, 0], [0, 1], [1, 1], [3, 3], [3, 4], [4, 4]]
    assert [[a.version for a in s] for s in steps] == versions
    assert [[a.staleness for a in s] for s in steps] == [[0, 0], [1, 0], [1, 1]] * 2
    assert [s[-1].finish for s in steps] == [1.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    # clients in flight at once are distinct: three runs starting together never share one
    assert all(len({a.client for a in s}) == len(s) for s in steps)
    # at most 0 stale: run 2 is dropped, so 3 and 4 (both from v1) make step 2
    fresh = _schedule(config.model_copy(update={"max_staleness": 0}), 2)
    assert [(a.run, a.staleness, a.too_stale) for a in fresh[1]] == [
        (2, 1, True),
        (3, 0, False),
        (4, 0, False),
    ]


def test_a_restored_simulation_continues_the_same_schedule() -> None:
    config = corral.FedBuff(
        clients=30,
        buffer=3,
        concurrency=9,
        stragglers=0.2,
        slowdown=4,
        dropout=0.2,
        max_staleness=2,
    )
    whole = _schedule(config, 8)
    first = EventSimulation(config, seed=0)
    for _ in range(3):
        first.next_step()
    second = EventSimulation(config, seed=0)
    second.load_state_dict(first.state_dict())
    assert [second.next_step() for _ in range(5)] == whole[3:]
    arrivals = [a for s in whole for a in s]
    assert any(not a.reported for a in arrivals) and any(a.too_stale for a in arrivals)
    assert all(sum(a.buffered for a in s) == 3 for s in whole)
    assert len(first.stragglers) == 6


def test_the_staleness_rules() -> None:
    assert staleness_weight(3, "sqrt") == 0.5
    assert staleness_weight(3, "inverse") == 0.25
    assert staleness_weight(3, "none") == staleness_weight(0, "sqrt") == 1.0
    assert staleness_weight(3, "staleness") == pytest.approx(1 / 3)  # the servers' rule


@pytest.mark.slow
def test_with_every_client_fresh_a_step_is_fedavg_over_the_buffered_clients() -> None:
    # as many in flight as the buffer holds, every run as long: all start from one model
    config = corral.FedBuff(clients=12, buffer=3, concurrency=3, durations="constant")
    result = _fit(config, epochs=3)
    expected, stalenesses = _replay(config, 3, lr=0.5)
    assert stalenesses == [[0, 0, 0]] * 3
    assert torch.allclose(_flat(result.model), expected, atol=1e-5)
    row = result.history[-1]
    assert (row["clients_reported"], row["staleness_mean"], row["staleness_max"]) == (3, 0, 0)
    assert row["dropped_stale"] == 0 and row["updates_per_s"] > 0


@pytest.mark.slow
def test_stale_updates_are_weighed_down_and_a_resumed_job_continues_exactly(tmp_path) -> None:
    config = corral.FedBuff(
        clients=12, buffer=2, concurrency=5, stragglers=0.25, slowdown=4, max_staleness=2
    )
    whole = _fit(config, epochs=6, checkpoint_dir=tmp_path / "whole", keep_checkpoints=6)
    expected, stalenesses = _replay(config, 6, lr=0.5)
    assert torch.allclose(_flat(whole.model), expected, atol=1e-5)
    recorded = [r["staleness_mean"] for r in whole.history]
    assert recorded == pytest.approx([np.mean(s) for s in stalenesses])
    assert max(recorded) > 0 and [r["staleness_max"] for r in whole.history] == [
        max(s) for s in stalenesses
    ]
    dropped = [sum(a.too_stale for a in s) for s in _schedule(config, 6)]
    assert [r["dropped_stale"] for r in whole.history] == dropped and sum(dropped) > 0
    # after round 3, clients that started from versions 1 and 2 are still in flight
    third = tmp_path / "whole" / "checkpoint-000003.pt"
    assert sorted(torch.load(third)["strategy"]["past"]) == [1, 2]
    resumed = _fit(config, epochs=6, checkpoint_dir=tmp_path / "second", resume_from=third)
    assert [r["staleness_mean"] for r in resumed.history] == pytest.approx(recorded)
    # exact: the simulation and the past weights in-flight clients started from came back
    assert torch.equal(_flat(resumed.model), _flat(whole.model))


@pytest.mark.slow
def test_digits_is_learnt_with_stale_updates() -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    result = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        ),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        strategy=corral.FedBuff(
            clients=20, buffer=4, concurrency=8, local_epochs=5, stragglers=0.1
        ),
        workers=2,
        epochs=10,
        batch_size=10,
        checkpoint_every=10,
    ).fit((x[:1400], y[:1400]), validation=(x[1400:], y[1400:]), on_report=None)
    accuracy = [r["val_accuracy"] for r in result.history]
    assert accuracy[0] < 0.6 and max(accuracy[-3:]) > 0.8  # 10 classes: chance is 0.1
    assert np.mean([r["staleness_mean"] for r in result.history]) > 0.5


def test_bad_fedbuff_settings_are_one_line_each() -> None:
    with pytest.raises(ValueError, match="buffer 4 is more than the 3 clients in flight"):
        corral.FedBuff(clients=10, buffer=4, concurrency=3)
    with pytest.raises(ValueError, match=r"more than the 1 clients in flight \(fraction"):
        corral.FedBuff(clients=10, buffer=2)  # concurrency defaults to fraction × clients
    with pytest.raises(ValueError, match="concurrency 11 asks for more clients in flight"):
        corral.FedBuff(clients=10, buffer=2, concurrency=11)
    with pytest.raises(corral.SpecError, match=r"strategy\.buffer: .*greater than or equal to 1"):
        _fit({"kind": "fedbuff", "clients": 10, "buffer": 0}, epochs=1)
    common = {"clients": 10, "buffer": 2, "concurrency": 4}
    with pytest.raises(ValueError, match="privacy: DP accounting assumes rounds"):
        corral.FedBuff(**common, privacy=Privacy(clip=1.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="secure aggregation of FedBuff's buffer is not built"):
        corral.FedBuff(**common, secure=SecureAggregation())
    with pytest.raises(ValueError, match="the median aggregate needs every update"):
        corral.FedBuff(**common, aggregate={"kind": "median"})


def test_fedbuff_reads_from_yaml() -> None:
    settings = parse(
        TrainSettings,
        {"strategy": {"kind": "fedbuff", "clients": 50, "buffer": 5, "concurrency": 20}},
        source="job.yaml",
    )
    assert settings.strategy == corral.FedBuff(clients=50, buffer=5, concurrency=20)
