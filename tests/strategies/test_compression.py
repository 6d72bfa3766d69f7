"""Compressed all-reduce against the exact average gradient, computed here in one process.

Replicas that agree can still agree on a wrong sum, so each test trains a real 2-worker
job with plain SGD and compares its parameters with `sequential_sgd`, which takes every
step on both workers' batches at once with the exact gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import blobs, sequential_sgd

import corral

pytestmark = pytest.mark.slow


def fit(model, strategy: corral.AllReduce, data, *, lr: float, batch_size: int, tmp_path):
    """One epoch of `strategy` on 2 workers with plain SGD; returns the trained model."""
    trainer = corral.Trainer(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        strategy=strategy,
        workers=2,
        batch_size=batch_size,
        checkpoint_dir=tmp_path,
    )
    return trainer.fit(data, on_report=None).model


def updates(model, data, *, lr: float, batch_size: int, **fit_args) -> tuple:
    """The change of every parameter in the job, and in the exact reference."""
    torch.manual_seed(0)  # what each worker does before it builds the model
    start = model()
    reference = sequential_sgd(copy.deepcopy(start), data, lr=lr, batch_size=batch_size)
    trained = fit(model, data=data, lr=lr, batch_size=batch_size, **fit_args)
    begin = torch.nn.utils.parameters_to_vector(start.parameters()).detach()
    ours = begin - torch.nn.utils.parameters_to_vector(trained.parameters()).detach()
    exact = begin - torch.nn.utils.parameters_to_vector(reference.parameters()).detach()
    return ours, exact


def blob_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_fp16_gives_the_exact_average_gradient_to_fp16_precision(tmp_path):
    # 32 samples, 2 workers of batch 16: one step; at lr 1 the update is the gradient
    strategy = corral.AllReduce(compression="fp16")
    ours, exact = updates(
        blob_model, blobs(32), lr=1.0, batch_size=16, strategy=strategy, tmp_path=tmp_path
    )
    # each half rounded to fp16, then their fp16 sum: a few units of fp16's 2**-11
    scale = exact.abs().max()
    assert torch.allclose(ours, exact, rtol=2e-3, atol=1e-3 * scale.item())
    assert (ours - exact).abs().max() > 1e-6  # it did go through fp16: not float32-exact


#: Inputs of the PowerSGD model: wide enough that its first layer's gradient (32 × 32) is
#: compressed, and each step's average gradient of it has rank 4 (one per sample).
WIDTH, SAMPLES, BATCH = 32, 12, 2


def wide_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 3)
    )


def wide_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(SAMPLES, WIDTH)).astype(np.float32), rng.integers(0, 3, SAMPLES)


@pytest.mark.parametrize(
    ("rank", "warmup", "exact"),
    [
        (1, 3, True),  # all 3 steps are warm-up: plain all-reduce, even at rank 1
        (4, 2, True),  # step 3 compressed at rank 4 ≥ the gradient's rank: no loss
        (3, 2, False),  # step 3 compressed at rank 3, one short of 4: an approximation
    ],
    ids=["warm-up", "rank-covers-the-gradient", "one-rank-short"],
)
def test_powersgd_is_exact_when_its_rank_covers_the_gradient(tmp_path, rank, warmup, exact):
    """2 workers × batch 2 × 3 steps. After warm-up, PowerSGD projects the summed gradient
    on `rank` directions of its own column space, which holds the whole matrix when the
    rank is at least the matrix's (4 samples a step); one rank short, the comparison sees
    the approximation (an error of about 7% of the update, against 1e-8 at rank 4)."""
    strategy = corral.AllReduce(compression="powersgd", powersgd_rank=rank, powersgd_warmup=warmup)
    ours, reference = updates(
        wide_model, wide_data(), lr=0.1, batch_size=BATCH, strategy=strategy, tmp_path=tmp_path
    )
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6) == exact
