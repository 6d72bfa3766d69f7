"""Sparse embedding tables on the parameter server: exact in sync, and only touched rows move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sequential_sgd

import corral
from corral.ps.gradient import Gradient
from corral.ps.layout import Layout

VOCAB, DIM, TOKENS = 2000, 16, 4


class Bag(torch.nn.Module):
    def __init__(self, sparse: bool = True) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(VOCAB, DIM, mode="mean", sparse=sparse)
        self.out = torch.nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def tokens(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bags of token ids whose class is the first token's id modulo 3."""
    x = np.random.default_rng(0).integers(0, VOCAB, size=(n, TOKENS))
    return x, x[:, 0] % 3


def fit(tmp_path, *, sparse: bool, mode: str = "sync", samples: int = 256, lr: float = 0.5):
    def model() -> torch.nn.Module:
        return Bag(sparse)

    strategy = corral.ParameterServer(mode=mode, servers=2, optimizer_args={"lr": lr})
    trainer = corral.Trainer(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        strategy=strategy,
        workers=2,
        epochs=1,
        batch_size=16,
        checkpoint_dir=tmp_path,
    )
    return trainer.fit(tokens(samples), on_report=None)


@pytest.mark.slow
def test_sync_with_a_sparse_table_equals_sequential_sgd(tmp_path):
    result = fit(tmp_path, sparse=True)
    torch.manual_seed(0)
    reference = sequential_sgd(Bag(sparse=False), tokens(256), lr=0.5)
    for ours, theirs in zip(result.model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_a_sparse_table_moves_only_the_rows_a_step_touches(tmp_path):
    sparse = fit(tmp_path / "sparse", sparse=True, mode="async", samples=512)
    dense = fit(tmp_path / "dense", sparse=False, mode="async", samples=512)
    # dense: the whole 2000×16 table goes out and back on each of 32 steps; sparse: a few
    # dozen rows, plus the whole table at start and at the epoch's end
    assert sparse.metrics["server_bytes"] < 0.2 * dense.metrics["server_bytes"]
    assert sparse.metrics["loss"] == pytest.approx(dense.metrics["loss"], rel=0.5)


def test_rows_are_routed_to_the_servers_that_own_them():
    layout = Layout.split(10, 3, [7, 2])
    assert layout.rows == ((0, 2, 5, 7), (0, 1, 1, 2))
    routed = layout.route(0, np.array([6, 0, 3, 1]))
    assert [r.tolist() for r in routed] == [[1, 3], [2], [0]]
    assert [r.tolist() for r in layout.route(1, np.array([1, 0]))] == [[1], [], [0]]


def test_a_group_mean_keeps_every_workers_rows_at_one_nth():
    a = Gradient(np.ones(2, np.float32), ((np.array([0, 3]), np.ones((2, 1), np.float32)),))
    b = Gradient(np.zeros(2, np.float32), ((np.array([3]), np.full((1, 1), 4, np.float32)),))
    mean = Gradient.mean([a, b])
    assert mean.dense.tolist() == [0.5, 0.5]
    ((rows, values),) = mean.rows
    summed = np.zeros(4)
    np.add.at(summed, rows, values[:, 0])
    assert summed.tolist() == [0.5, 0.0, 0.0, 2.5]
