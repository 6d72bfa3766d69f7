"""Federated averaging and its variants, simulated on a pool of real worker processes.

The round is checked against a hand computation (FedSGD: one full-batch step per client,
so the order of samples does not matter), the pool size is checked not to change the
result, FedAdam's server moments are checked to survive a resume, and digits split into
two-label shards is checked to be learnt. Bad input is refused on the caller's side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import corral
from corral.errors import DataError, SpecError
from corral.federated import IID, Dirichlet, LabelShards, SecureAggregation
from corral.federated.privacy import BudgetSpent, Privacy
from corral.spec import TrainSettings, parse
from corral.strategies.fedavg import sample_clients

RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 2)


def _fit(
    strategy: corral.Strategy,
    *,
    workers: int = 2,
    epochs: int = 2,
    batch_size: int = 4,
    lr: float = 0.3,
    **kwargs,
) -> corral.Result:
    return corral.Trainer(
        model=_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        strategy=strategy,
        workers=workers,
        epochs=epochs,
        batch_size=batch_size,
        **kwargs,
    ).fit((X, Y), on_report=None)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow
def test_a_fedsgd_round_is_the_sample_weighted_mean_of_the_clients_steps() -> None:
    config = corral.FedAvg(clients=12, fraction=0.5, partition=IID())
    result = _fit(config, batch_size=1000, lr=0.5)  # B ≥ any client's data: one step each
    parts = IID().split(Y, clients=12, seed=0)
    model = _model()
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    for round_ in range(2):
        start = _flat(model)
        _, reporting = sample_clients(config, seed=0, round_=round_)
        total, moved = 0.0, torch.zeros_like(start)
        for client in reporting:
            rows = torch.from_numpy(parts[client])
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            moved += len(rows) * (-0.5 * grad)
            total += len(rows)
        torch.nn.utils.vector_to_parameters(start + moved / total, model.parameters())
    assert torch.allclose(_flat(result.model), _flat(model), atol=1e-5)
    row = result.history[-1]
    assert (row["clients"], row["clients_reported"], row["clients_dropped"]) == (6, 6, 0)
    assert row["updates_per_s"] > 0 and row["client_compute_s"] > 0


@pytest.mark.slow
def test_the_pool_size_does_not_change_the_model_and_fedprox_mu_0_is_fedavg() -> None:
    shards, dropout = LabelShards(shards=2), 0.3
    two = _fit(
        corral.FedAvg(clients=20, fraction=0.5, local_epochs=2, partition=shards, dropout=dropout)
    )
    one = _fit(
        corral.FedProx(
            clients=20, fraction=0.5, local_epochs=2, partition=shards, dropout=dropout, mu=0.0
        ),
        workers=1,
    )
    assert torch.allclose(_flat(two.model), _flat(one.model), atol=1e-5)
    rows = two.history
    assert all(r["clients_reported"] + r["clients_dropped"] == r["clients"] == 10 for r in rows)
    assert sum(r["clients_dropped"] for r in rows) > 0


def test_the_fedprox_term_pulls_each_gradient_toward_the_global_weights() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.zeros(2)
    corral.FedProx(clients=2, mu=0.5).penalise([p], torch.tensor([0.0, 4.0]))
    assert p.grad.tolist() == [0.5, -1.0]


@pytest.mark.parametrize(
    ("cls", "v_after"),
    [
        (corral.FedAdagrad, 1e-6 + 4.0),
        (corral.FedAdam, 0.99 * 1e-6 + 0.01 * 4.0),
        (corral.FedYogi, 1e-6 + 0.01 * 4.0),
    ],
)
def test_fedopt_moves_by_its_moments(cls: type[corral.FedAdam], v_after: float) -> None:
    config = cls(clients=2, server_lr=0.1)
    state: dict[str, torch.Tensor] = {}
    new = config.server_step(state, torch.zeros(1), torch.tensor([2.0]))
    assert state["m"].item() == pytest.approx(0.2)
    assert state["v"].item() == pytest.approx(v_after)
    assert new.item() == pytest.approx(0.1 * 0.2 / (v_after**0.5 + 1e-3))


@pytest.mark.slow
def test_a_resumed_dp_fedadam_continues_its_moments_and_its_privacy_budget(tmp_path) -> None:
    # q = 0.5, z = 1: epsilon 3.89, 5.38, 6.48, 7.41, then 8.23 > 8, so 4 rounds of 10
    budget = Privacy(clip=1.0, noise_multiplier=1.0, max_epsilon=8.0)
    adam = corral.FedAdam(clients=10, fraction=0.5, server_lr=0.05, privacy=budget)
    whole = _fit(adam, epochs=10, checkpoint_dir=tmp_path / "whole")
    assert [r["epoch"] for r in whole.history] == [1, 2, 3, 4]
    epsilons = [r["epsilon"] for r in whole.history]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 8.0
    assert whole.history[-1]["privacy_budget_spent"] == 1.0
    first = _fit(adam, epochs=2, checkpoint_dir=tmp_path / "first")
    resumed = _fit(
        adam, epochs=10, checkpoint_dir=tmp_path / "second", resume_from=first.checkpoint
    )
    # the budget spent before the restart counts: the resumed job stops at the same round
    assert [r["epsilon"] for r in resumed.history] == pytest.approx(epsilons)
    # the moments were restored too: without them round 3 would take another step
    assert torch.allclose(_flat(resumed.model), _flat(whole.model), atol=1e-6)
    assert not torch.allclose(_flat(first.model), _flat(whole.model), atol=1e-3)


@pytest.mark.slow
def test_secure_aggregation_sums_what_the_plain_mean_sums_and_fails_short_of_its_threshold():
    # 120 samples over 12 clients: 10 each, so the uniform and the weighted mean agree
    common = {"clients": 12, "fraction": 0.5, "dropout": 0.3}
    plain = _fit(corral.FedAvg(**common))
    # 6 clients a round, full graph: 2 of a client's 5 neighbours rebuild its secrets
    secure = _fit(corral.FedAvg(**common, secure=SecureAggregation(threshold=0.4)))
    assert torch.allclose(_flat(secure.model), _flat(plain.model), atol=1e-5)
    rows = secure.history
    assert sum(r["clients_dropped"] for r in rows) > 0  # masks were removed from shares
    assert all(r["secagg_bytes_per_client"] > 0 for r in rows)
    every_share = SecureAggregation(threshold=1.0)  # a dropout leaves a secret unrecoverable
    with pytest.raises(
        corral.WorkerError,
        match=r"SecAggError: secure aggregation cannot unmask: .* nothing is revealed",
    ):
        _fit(corral.FedAvg(**common, secure=every_share))


@pytest.mark.slow
def test_digits_in_two_label_shards_per_client_is_learnt() -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    result = corral.Trainer(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        ),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        strategy=corral.FedAvg(
            clients=100, fraction=0.1, local_epochs=5, partition=LabelShards(shards=2)
        ),
        workers=2,
        epochs=40,
        batch_size=10,
        checkpoint_every=40,
    ).fit((x[:1400], y[:1400]), validation=(x[1400:], y[1400:]), on_report=None)
    accuracy = [r["val_accuracy"] for r in result.history]
    assert accuracy[0] < 0.3 and max(accuracy[-10:]) > 0.7  # 10 classes: chance is 0.1


def test_bad_federated_settings_are_one_line_each() -> None:
    with pytest.raises(
        ValueError, match="min_clients 30 asks for more clients a round than the 20"
    ):
        corral.FedAvg(clients=20, min_clients=30)
    with pytest.raises(SpecError, match="krum needs at least 5 clients a round, 2 are sampled"):
        _fit({"kind": "fedavg", "clients": 20, "fraction": 0.1, "aggregate": {"kind": "krum"}})
    # the data is checked on the caller's side, before any worker starts
    with pytest.raises(DataError, match=r"left \d+ of 100 clients with no data; raise alpha"):
        _fit(corral.FedAvg(clients=100, partition=Dirichlet(alpha=0.01)))
    with pytest.raises(DataError, match="121 clients but only 120 samples"):
        _fit(corral.FedAvg(clients=121))
    one_round_too_many = Privacy(clip=1.0, noise_multiplier=1.0, max_epsilon=1.0)
    with pytest.raises(BudgetSpent, match=r"privacy budget spent: epsilon 3\.89 > max_epsilon 1"):
        _fit(corral.FedAvg(clients=10, fraction=0.5, privacy=one_round_too_many))
    with pytest.raises(ValueError, match="cannot be combined with the median aggregate"):
        corral.FedAvg(clients=10, privacy=one_round_too_many, aggregate={"kind": "median"})


def test_a_federated_strategy_reads_from_yaml() -> None:
    settings = parse(
        TrainSettings,
        {
            "strategy": {
                "kind": "fedprox",
                "clients": 50,
                "mu": 0.1,
                "partition": {"kind": "dirichlet", "alpha": 0.3},
                "aggregate": {"kind": "trimmed_mean", "trim": 0.2},
            }
        },
        source="job.yaml",
    )
    assert settings.strategy == corral.FedProx(
        clients=50,
        mu=0.1,
        partition=Dirichlet(alpha=0.3),
        aggregate={"kind": "trimmed_mean", "trim": 0.2},
    )
