"""The classic kinds as jobs like any other: a service job of kind xgboost reports its
rounds as epochs and leaves its model; ``corral train`` runs a YAML of kind sklearn;
``corral tune`` searches a boosting job's params with a pruner fed by its rounds; a
classic model is a Spark SQL function; bad params are refused at submit, in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import wait_until

import corral
from corral.classic import ClassicModel
from corral.errors import SpecError
from corral.runtime.resources import Resources
from corral.service import submission
from corral.service.runner import Runner
from corral.service.store import FINAL, Store
from corral.spec import parse_job

POOL = Resources(cpus=4, memory_mib=8192)


def blob_files(folder: Path, rows: int = 300) -> dict:
    """Two separable classes in train/test Parquet files; the data part of a spec."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    frame = pd.DataFrame({"a": rng.normal(size=rows) + 2.5 * y, "b": rng.normal(size=rows)})
    frame["y"] = y
    cut = rows * 2 // 3
    frame[:cut].to_parquet(folder / "train.parquet")
    frame[cut:].to_parquet(folder / "test.parquet")
    return {
        "data": {"path": str(folder / "train.parquet"), "label": "y"},
        "validation": {"path": str(folder / "test.parquet"), "label": "y"},
    }


@pytest.mark.slow
def test_a_service_job_of_kind_xgboost_reports_rounds_and_leaves_its_model(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    runner = Runner(store, pool=POOL, state_dir=tmp_path / "state", interval=0.1)
    runner.start()
    try:
        spec = {"kind": "xgboost", "name": "trees", "rounds": 6, **blob_files(tmp_path)}
        spec["params"] = {"max_depth": 2}
        job = submission.queue(store, POOL, user, spec)
        wait_until(lambda: store.job(job.id).state in FINAL, 120, "the job")
        folder = tmp_path / "state" / "jobs" / job.id
        log = (folder / "log").read_text()
        assert store.job(job.id).state == "succeeded", log
    finally:
        runner.stop(stop_jobs=True)
        store.close()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    assert epochs[-1]["val_accuracy"] > 0.85
    model = ClassicModel.load(folder / "model.pkl")
    test = pd.read_parquet(tmp_path / "test.parquet")
    assert (model.predict(test[["a", "b"]].to_numpy()) == test.y).mean() > 0.85


def test_a_param_the_library_does_not_know_is_refused_at_submit(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_team("vision")
    user, _ = store.create_user("ada", "vision")
    spec = {"kind": "xgboost", **blob_files(tmp_path), "params": {"max_detph": 3}}
    with pytest.raises(SpecError, match=r"params\.max_detph: .*did you mean 'max_depth'"):
        submission.queue(store, POOL, user, spec)
    assert store.jobs(states=["queued"]) == []
    spec = {"kind": "boosted", **blob_files(tmp_path)}
    with pytest.raises(SpecError, match="unknown job kind 'boosted'; allowed: torch, xgboost"):
        submission.queue(store, POOL, user, spec)
    store.close()


@pytest.mark.slow
def test_corral_train_runs_a_yaml_of_kind_sklearn(tmp_path):
    spec = {
        "kind": "sklearn",
        "estimator": "sklearn.tree:DecisionTreeClassifier",
        "roles": {"worker": {"count": 2}},
        **blob_files(tmp_path),
        "search": {"space": {"max_depth": [1, 3]}, "cv": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "corral", "train", "job.yaml"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cv_score=" in done.stderr and "val_accuracy=" in done.stderr
    [saved] = (tmp_path / "corral-runs").glob("job-*/model.pkl")
    model = ClassicModel.load(saved)
    assert model.kind == "sklearn" and model.estimator.get_params()["max_depth"] in (1, 3)


@pytest.mark.slow
def test_tune_searches_a_boosting_jobs_params_pruning_on_its_rounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = {"kind": "xgboost", "rounds": 8, **blob_files(tmp_path)}
    found = corral.tune(
        job,
        {"params.learning_rate": {"low": 1e-4, "high": 0.5, "log": True}},
        metric="val_logloss",
        mode="min",
        trials=3,
        concurrency=2,
        sampler="random",
        pruner={"kind": "asha", "min_epochs": 2},
    )
    states = [t.state for t in found.trial_list]
    assert len(states) == 3 and set(states) <= {"complete", "pruned"}
    assert found.best.state == "complete" and found.best.epochs == 8
    assert found.best_spec["params"]["learning_rate"] == found.best.params["params.learning_rate"]
    # a smaller loss for a larger rate, on separable data, in 8 rounds
    best_lr = found.best.params["params.learning_rate"]
    assert all(best_lr >= t.params["params.learning_rate"] for t in found.trial_list)


@pytest.mark.spark
@pytest.mark.slow
def test_a_classic_model_is_a_spark_sql_function(spark, tmp_path):
    spec = parse_job(
        {"kind": "sklearn", "estimator": "sklearn.linear_model:LogisticRegression",
         **blob_files(tmp_path)}
    )
    result = corral.classic.fit(spec, base=tmp_path, out=tmp_path / "out")
    test = pd.read_parquet(tmp_path / "test.parquet")
    corral.spark.register(spark, "blob_class", ClassicModel.load(result.path))
    spark.createDataFrame(test).createOrReplaceTempView("blobs")
    scored = spark.sql("SELECT a, b, blob_class(a, b) AS p FROM blobs").toPandas()
    assert dict(spark.sql("SELECT blob_class(a, b) FROM blobs").dtypes) == {
        "blob_class(a, b)": "bigint"
    }
    expected = result.model.predict(scored[["a", "b"]].to_numpy(np.float32))
    assert (scored.p.to_numpy() == expected).all()
    assert (scored.p.to_numpy() == test.y.to_numpy()).mean() > 0.85
