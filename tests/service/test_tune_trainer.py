"""``corral.tune`` given a `Trainer`: its Python parts travel pickled to the trials' jobs,
its arrays as Parquet; an `OptimizerSpec` stays searchable, any other optimizer travels
as it is; what a job cannot hold is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import blobs

import corral
from corral.errors import SpecError
from corral.jobs import job_of_trainer, trainer_for
from corral.spec import parse_job


def trainer(**extra) -> corral.Trainer:
    return corral.Trainer(
        model=lambda: torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
                                          torch.nn.Linear(16, 3)),
        loss=torch.nn.CrossEntropyLoss(),
        **{"optimizer": corral.OptimizerSpec(name="sgd", lr=0.1), "epochs": 2, **extra},
    )


@pytest.mark.slow
def test_tune_searches_a_trainers_learning_rate_with_trials_as_jobs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = blobs(300)
    found = corral.tune(
        trainer(),
        {"optimizer.lr": {"choices": [1e-6, 0.5]}},
        data=(x[:200], y[:200]),
        validation=(x[200:], y[200:]),
        trials=2,
        sampler="grid",
        pruner="none",
    )
    assert [t.state for t in found.trial_list] == ["complete", "complete"]
    assert found.best.params == {"optimizer.lr": 0.5} and found.best.value > 0.9
    worst = min(t.value for t in found.trial_list)
    assert worst < 0.7  # lr 1e-6 barely moves in 2 epochs: the search told them apart
    pickled = Path(found.best_spec["entrypoint"].rsplit(":", 1)[0])
    assert pickled.is_file() and pickled.is_relative_to(tmp_path / "corral-tune")


def test_a_trainers_other_optimizer_travels_pickled_and_a_dataframe_as_parquet(tmp_path):
    x, y = blobs(60)
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y})
    given = trainer(optimizer=lambda p: torch.optim.Adam(p, lr=0.02), checkpoint_dir="mine")
    spec = parse_job(job_of_trainer(given, frame, label="y", folder=tmp_path))
    assert spec.optimizer == f"{tmp_path / 'trainer.pkl'}:optimizer"
    assert spec.checkpoint.dir is None  # each trial's job keeps its own
    rebuilt, data, _ = trainer_for(spec, base=tmp_path)
    assert isinstance(rebuilt.optimizer(torch.nn.Linear(2, 2).parameters()), torch.optim.Adam)
    assert data.num_samples == 60 and pd.read_parquet(spec.data.path).columns.tolist() == [
        "a", "b", "y"
    ]


def test_what_a_job_cannot_hold_is_refused_in_one_line(tmp_path):
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(SpecError, match=r"data: a search of a Trainer takes \(X, y\) arrays"):
        job_of_trainer(trainer(), dataset, folder=tmp_path)
    with pytest.raises(SpecError, match="data: a search of a Trainer needs the data"):
        corral.tune(trainer(), {"optimizer.lr": {"low": 0.01, "high": 0.1}}, folder=tmp_path)
