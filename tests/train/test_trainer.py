"""Trainer.fit end to end on real workers, and every bad input it must refuse."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DieOnceLoss, blobs

import corral
from corral.errors import CheckpointError, DataError, SpecError, WorkerError

pytestmark = pytest.mark.slow


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def trainer(tmp_path, **kw) -> corral.Trainer:
    args = dict(
        model=small_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        workers=2,
        epochs=3,
        batch_size=16,
        checkpoint_dir=tmp_path / "ckpt",
    )
    return corral.Trainer(**(args | kw))


@pytest.mark.parametrize("strategy", [corral.AllReduce(), corral.Averaging(every=4)])
def test_fit_learns_and_returns_model_history_checkpoint(tmp_path, strategy):
    x, y = blobs()
    xv, yv = blobs(100, seed=1)
    result = trainer(tmp_path, strategy=strategy).fit((x, y), validation=(xv, yv))
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    last = result.metrics
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "time_s"} <= set(last)
    assert last["val_accuracy"] > 0.9 and last["loss"] < result.history[0]["loss"]
    assert not result.model.training
    with torch.no_grad():
        accuracy = (result.model(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean()
    assert accuracy == pytest.approx(last["val_accuracy"])  # the returned model is the trained one
    assert result.checkpoint == tmp_path / "ckpt" / "checkpoint-000003.pt"


def test_averaging_syncs_every_n_steps(tmp_path):
    x, y = blobs(256)
    # 256 samples / 2 workers / batch 16 = 8 steps per epoch; every=3 → syncs after 3 and 6
    result = trainer(tmp_path, strategy=corral.Averaging(every=3), epochs=1).fit((x, y))
    assert result.metrics["syncs"] == 2


def test_dataframe_with_named_columns(tmp_path):
    x, y = blobs()
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "target": y})
    result = trainer(tmp_path, epochs=1, workers=1).fit(df, features=["a", "b"], label="target")
    assert result.metrics["accuracy"] > 0.5


def test_missing_columns_are_listed_before_anything_starts(tmp_path):
    df = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "target": [0, 1]})
    with pytest.raises(DataError, match=r"'nope'.*a, b, target"):
        trainer(tmp_path).fit(df, features=["a", "nope"], label="target")


def test_x_and_y_of_different_lengths(tmp_path):
    x, y = blobs()
    with pytest.raises(DataError, match="400 rows but y has 399"):
        trainer(tmp_path).fit((x, y[:-1]))


def test_nan_features_are_refused(tmp_path):
    x, y = blobs()
    x[17, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        trainer(tmp_path).fit((x, y))


def test_model_factory_that_raises(tmp_path):
    def broken():
        raise RuntimeError("no such layer")

    with pytest.raises(SpecError, match=r"factory .*broken raised RuntimeError: no such layer"):
        trainer(tmp_path, model=broken).fit(blobs())


def nan_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.sum() * float("nan")


def test_nan_loss_stops_with_the_step(tmp_path):
    with pytest.raises(WorkerError) as info:
        trainer(tmp_path, loss=nan_loss, max_restarts=2).fit(blobs())
    assert info.value.exc_type == "TrainingError"
    assert "the loss became nan at epoch 1, step 1" in str(info.value)
    assert info.value.restarts == 0  # a NaN would come back: no restart


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "ring-of-fire"}, "strategy.kind: unknown strategy 'ring-of-fire'"),
        ({"workers": 0}, "roles.worker.count"),
        ({"epochs": 0}, "epochs"),
        ({"strategy": {"kind": "averaging", "every": 0}}, "strategy.every"),
        ({"loss": "mse"}, "loss: expected a callable"),
    ],
)
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(SpecError, match=message):
        trainer(tmp_path, **kwargs)


def test_resume_from_a_bad_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer(tmp_path, resume_from=tmp_path / "missing.pt").fit(blobs())
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match="not a corral checkpoint"):
        trainer(tmp_path, resume_from=junk).fit(blobs())


def test_resume_continues_a_finished_run(tmp_path):
    first = trainer(tmp_path, epochs=2).fit(blobs())
    more = trainer(
        tmp_path, epochs=4, resume_from=first.checkpoint, checkpoint_dir=tmp_path / "more"
    ).fit(blobs())
    assert [r["epoch"] for r in more.history] == [1, 2, 3, 4]
    assert more.history[:2] == first.history  # epochs 1–2 were not trained again


def test_killed_worker_restarts_from_the_last_checkpoint(tmp_path, caplog):
    result = trainer(tmp_path, loss=DieOnceLoss(), max_restarts=1, epochs=3).fit(blobs())
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert "worker 1 failed (was killed by SIGKILL); restarting" in caplog.text


def test_killed_worker_without_restarts_fails(tmp_path):
    with pytest.raises(WorkerError, match="worker 1 was killed by SIGKILL"):
        trainer(tmp_path, loss=DieOnceLoss(), epochs=3).fit(blobs())


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = blobs(64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def test_torch_dataset_input(tmp_path):
    result = trainer(tmp_path, epochs=1).fit(Pairs())
    assert result.history[0]["loss"] > 0
