"""Every run in MLflow, on a real MLflow store (SQLite in the test's folder): params,
tags, each epoch once, the artifacts and the model; a continued run repeats no epoch; a
failed fit ends its run FAILED."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import corral
from corral.errors import WorkerError

mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    """MLflow puts a SQLite store's artifacts in ./mlruns: here, the test's folder."""
    monkeypatch.chdir(tmp_path)


def data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def trainer(tmp_path, tracking, **kw) -> corral.Trainer:
    return corral.Trainer(
        model=lambda: torch.nn.Linear(4, 2),
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        workers=2,
        batch_size=16,
        checkpoint_dir=tmp_path / "checkpoints",
        tracking=tracking,
        **kw,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating its tables takes seconds); each test
    has an experiment of its own."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_a_fit_is_one_run_with_params_tags_epochs_artifacts_and_model(tmp_path, store):
    spec = corral.MLflow(uri=store, experiment="tiny", run_name="first")
    result = trainer(tmp_path, spec, epochs=3).fit(data(), validation=data(64))
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    params, tags = run.data.params, run.data.tags
    assert params["strategy.kind"] == "allreduce" and params["roles.worker.count"] == "2"
    assert params["epochs"] == "3" and params["batch_size"] == "16"
    assert tags["corral.strategy"] == "allreduce" and tags["corral.engine"] == "local"
    assert tags["corral.workers"] == "2" and tags["corral.version"]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]  # each epoch once, step = epoch
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in result.history])
    accuracy = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert accuracy[-1].value == pytest.approx(result.metrics["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.json", "checkpoints"} <= artifacts
    (saved,) = client.list_artifacts(run.info.run_id, "checkpoints")
    assert saved.path.endswith(result.checkpoint.name)
    # the logged model predicts as the trained one does
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = torch.from_numpy(data(8)[0])
    assert torch.equal(model(x).argmax(1), result.model(x).argmax(1))


def test_a_continued_run_goes_on_from_its_last_epoch_and_repeats_none(tmp_path, store):
    first = trainer(
        tmp_path, corral.MLflow(uri=store, experiment="continued", log_model=False), epochs=2
    )
    first.fit(data())
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("continued").experiment_id])
    spec = corral.MLflow(uri=store, run_id=run.info.run_id, log_model=False)
    again = trainer(
        tmp_path, spec, epochs=4, resume_from=tmp_path / "checkpoints"
    )  # the restored epochs 1-2 are reported again, and not logged again
    again.fit(data())
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


class Boom(torch.nn.Module):
    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise ValueError("no loss today")


def test_a_failed_fit_ends_its_run_failed(tmp_path, store):
    bad = corral.Trainer(
        model=lambda: torch.nn.Linear(4, 2),
        loss=Boom(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        tracking=corral.MLflow(uri=store, experiment="failed"),
    )
    with pytest.raises(WorkerError, match="no loss today"):
        bad.fit(data())
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("failed").experiment_id])
    assert run.info.status == "FAILED"


def test_a_bad_tracking_spec_names_the_field():
    with pytest.raises(corral.SpecError, match="tracking"):
        corral.Trainer(
            model=lambda: torch.nn.Linear(4, 2),
            loss=torch.nn.CrossEntropyLoss(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
            tracking={"kind": "mlflow", "experimnt": "x"},
        )


def reporting(epochs: int) -> int:
    """A `corral.run` function: every rank reports; rank 0's reports are the run's."""
    ctx = corral.context()
    for epoch in range(1, epochs + 1):
        ctx.report(epoch=epoch, loss=1.0 / epoch + ctx.rank)
    ctx.report(score=0.5 + ctx.rank)  # no step named: the next one
    return ctx.rank


def test_corral_run_with_tracking_logs_rank_0s_reports(store):
    spec = corral.MLflow(uri=store, experiment="run", log_model=False)
    assert corral.run(reporting, 3, workers=2, tracking=spec) == 0
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["function"] == "reporting" and run.data.params["workers"] == "2"
    assert run.data.tags["corral.engine"] == "local"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in losses) == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    (score,) = client.get_metric_history(run.info.run_id, "score")
    assert (score.step, score.value) == (4, 0.5)


def test_a_failed_corral_run_ends_its_run_failed(store):
    spec = corral.MLflow(uri=store, experiment="run-fails")
    with pytest.raises(WorkerError):
        corral.run(reporting, "three", workers=1, tracking=spec)
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("run-fails").experiment_id])
    assert run.info.status == "FAILED"
