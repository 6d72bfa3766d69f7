"""A service with an MLflow store tracks every job in its team's experiment, and all
attempts of a job continue one run (real `corral server`, real MLflow store)."""

from __future__ import annotations

import signal

import httpx
import pytest
from conftest import job_spec, start_server, wait_until

from corral.service.job import TRACKING, _continued_run
from corral.spec import MLflow

mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    """MLflow puts a SQLite store's artifacts in ./mlruns: here, the test's folder."""
    monkeypatch.chdir(tmp_path)


def test_every_job_is_a_run_in_its_teams_experiment(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server, url, admin = start_server(tmp_path, "--cpus", "2", "--mlflow-uri", store)
    try:
        auth = {"Authorization": f"Bearer {admin}"}
        made = httpx.post(
            f"{url}/api/jobs", json={"spec": job_spec(tmp_path)}, headers=auth, timeout=30
        )
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]

        def state():
            return httpx.get(f"{url}/api/jobs/{job_id}", headers=auth, timeout=30).json()["state"]

        wait_until(lambda: state() in ("succeeded", "failed"), 180, "the job to end")
        assert state() == "succeeded"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    client = mlflow.tracking.MlflowClient(store)
    experiment = client.get_experiment_by_name("admin")  # the admin's team
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["corral.service_job"] == job_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.info.status == "FINISHED"


def test_the_attempts_of_a_job_continue_its_first_run(tmp_path):
    tracking = MLflow(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="vision")
    first = _continued_run(tmp_path, tracking)
    again = _continued_run(tmp_path, tracking)  # the next attempt, in a new process
    assert first.run_id is not None and again.run_id == first.run_id
    assert (tmp_path / TRACKING).exists()
