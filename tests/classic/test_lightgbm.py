"""``kind: lightgbm``: LightGBM's own distributed training, its workers real processes
talking over 127.0.0.1 (local) or tasks of a Spark barrier stage."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import alive, blobs

from corral import classic
from corral.classic import lightgbm as lgb_kind
from corral.classic.base import ClassicModel
from corral.errors import DataError, LaunchError, SpecError, WorkerError
from corral.spec import LightGBMSpec


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three blobs to train on (600 rows) and to validate on (200 others)."""
    folder = tmp_path_factory.mktemp("lightgbm")
    for name, n, seed in (("train", 600, 0), ("val", 200, 1)):
        x, y = blobs(n, seed=seed)
        frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y})
        frame.to_parquet(folder / f"{name}.parquet")
    return folder


def job(**fields) -> LightGBMSpec:
    fields.setdefault("validation", {"path": "val.parquet", "label": "y"})
    return LightGBMSpec(kind="lightgbm", data={"path": "train.parquet", "label": "y"}, **fields)


def workers(count: int) -> dict:
    return {"worker": {"count": count, "cpus": 1}}


def worker_pids() -> dict[int, int]:
    """This process's LightGBM workers still running, pid by rank (from their command
    line, where the rank is shown for ``ps``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        tag = [a for a in argv if a.startswith(b"corral-lightgbm-worker-")]
        if int(stat[1]) == os.getpid() and tag:
            found[int(tag[0].rsplit(b"-", 1)[1])] = int(proc.name)
    return found


@pytest.mark.slow
def test_two_workers_train_as_well_as_one_reporting_each_round_live(data):
    one = job(rounds=300, early_stopping=5)
    _, alone = lgb_kind.fit(one, base=data, report=lambda row: None)
    rows: list[dict] = []
    running_at_round_1: dict[int, int] = {}

    def report(row):
        rows.append(row)
        if row["epoch"] == 1:
            running_at_round_1.update(worker_pids())

    two = job(rounds=300, early_stopping=5, roles=workers(2))
    lgb_kind.check(two, base=data)
    model, metrics = lgb_kind.fit(two, base=data, report=report)

    assert metrics["val_accuracy"] > 0.9
    assert abs(metrics["val_accuracy"] - alone["val_accuracy"]) <= 0.03
    # one row per round, in order, reported while both workers ran
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert {"loss", "val_multi_logloss"} <= rows[0].keys() and rows[0]["epochs"] == 300
    assert sorted(running_at_round_1) == [0, 1] and not worker_pids()
    # early stopping agreed on both workers: it stopped, keeping the best round
    assert len(rows) < 300 and metrics["rounds"] == len(rows) - 5
    x, y = blobs(200, seed=1)
    assert isinstance(model, ClassicModel) and model.kind == "lightgbm"
    assert np.mean(model.predict(x) == y) == metrics["val_accuracy"]


def test_early_stopping_keeps_the_best_round(data, tmp_path):
    """Through `corral.classic.fit`, as ``corral train`` runs a job: the model is saved."""
    spec = job(rounds=500, early_stopping=3, params={"learning_rate": 0.3})
    result = classic.fit(spec, base=data, out=tmp_path)
    rows, rounds = result.history, result.metrics["rounds"]
    assert len(rows) < 500 and rounds == len(rows) - 3
    losses = [r["val_multi_logloss"] for r in rows]
    assert min(losses) == losses[int(rounds) - 1]
    loaded = ClassicModel.load(result.path)
    x, _ = blobs(50, seed=2)
    assert (loaded.predict(x) == result.model.predict(x)).all()


def test_regression_reports_rmse(data):
    spec = job(task="regression", rounds=20, validation=None)
    _, metrics = lgb_kind.fit(spec, base=data, report=lambda row: None)
    assert 0 < metrics["train_rmse"] < 0.5


@pytest.mark.slow
def test_a_killed_worker_ends_the_fit_with_its_name_and_no_orphan(data):
    pids: dict[int, int] = {}

    def kill_rank_1(row):
        if row["epoch"] == 1:
            pids.update(worker_pids())
            os.kill(pids[1], signal.SIGKILL)

    spec = job(rounds=100_000, roles=workers(2))
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker 1 was killed by SIGKILL") as err:
        lgb_kind.fit(spec, base=data, report=kill_rank_1)
    assert err.value.rank == 1
    assert time.monotonic() - start < 30
    assert sorted(pids) == [0, 1] and not any(alive(pid) for pid in pids.values())


@pytest.mark.slow
def test_a_report_raising_stops_the_workers(data):
    """As a search's pruner stops a trial: the error is the fit's, the workers end."""
    pids: dict[int, int] = {}

    class Pruned(Exception):
        pass

    def prune(row):
        pids.update(worker_pids())
        if row["epoch"] == 2:
            raise Pruned

    with pytest.raises(Pruned):
        lgb_kind.fit(job(rounds=100_000, roles=workers(2)), base=data, report=prune)
    assert sorted(pids) == [0, 1] and not any(alive(pid) for pid in pids.values())


@pytest.mark.slow
def test_a_port_taken_meanwhile_is_retried(data, monkeypatch):
    """The ports are free when picked and bound by LightGBM later: a start that finds
    one taken is started again on fresh ones."""
    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()
    picks = []
    pick = lgb_kind._free_ports

    def first_one_taken(n):
        ports = pick(n)
        picks.append(ports)
        return [taken.getsockname()[1], *ports[1:]] if len(picks) == 1 else ports

    monkeypatch.setattr(lgb_kind, "_free_ports", first_one_taken)
    with taken:
        _, metrics = lgb_kind.fit(job(rounds=5, roles=workers(2)), base=data, report=print)
    assert len(picks) == 2 and metrics["val_accuracy"] > 0.9


def test_an_unknown_param_names_the_near_one(data):
    with pytest.raises(SpecError, match=r"params\.lerning_rate: .*did you mean 'learning_rate'"):
        lgb_kind.check(job(params={"lerning_rate": 0.1}), base=data)
    lgb_kind.check(job(params={"reg_lambda": 1.0, "colsample_bytree": 0.5}), base=data)  # aliases


@pytest.mark.parametrize(
    ("param", "field"),
    [
        ("n_estimators", "rounds"),
        ("early_stopping_rounds", "early_stopping"),
        ("n_jobs", "roles.worker.cpus"),
        ("num_machines", "roles.worker.count"),
        ("local_listen_port", "roles.worker.count"),
    ],
)
def test_a_param_corral_sets_names_the_spec_field(data, param, field):
    with pytest.raises(SpecError, match=rf"params\.{param}: corral sets it; use {field}"):
        lgb_kind.check(job(params={param: 1}), base=data)


def test_a_tree_learner_that_does_not_split_rows_is_refused(data):
    with pytest.raises(SpecError, match=r"params\.tree_learner: 'feature'"):
        lgb_kind.check(job(params={"tree_learner": "feature"}), base=data)


def test_labels_must_be_classes_from_zero(tmp_path):
    x, y = blobs(60)
    pd.DataFrame({"a": x[:, 0], "y": y + 0.5}).to_parquet(tmp_path / "train.parquet")
    spec = LightGBMSpec(kind="lightgbm", data={"path": "train.parquet", "label": "y"})
    with pytest.raises(DataError, match=r"integers 0\.\.k-1"):
        lgb_kind.fit(spec, base=tmp_path, report=print)


@pytest.mark.spark
@pytest.mark.slow
def test_spark_barrier_fit_of_two_workers(spark, data):
    rows: list[dict] = []
    spec = job(engine="spark", spark={"master": "local[2]"}, rounds=15, roles=workers(2))
    model, metrics = lgb_kind.fit(spec, base=data, report=rows.append)
    assert metrics["val_accuracy"] > 0.9
    assert [r["epoch"] for r in rows] == list(range(1, 16))
    x, y = blobs(200, seed=1)
    assert np.mean(model.predict(x) == y) == metrics["val_accuracy"]


@pytest.mark.spark
def test_spark_refuses_more_workers_than_task_slots_at_once(spark, data):
    spec = job(engine="spark", spark={"master": "local[2]"}, roles=workers(3))
    start = time.monotonic()
    with pytest.raises(LaunchError, match="needs 3 task slots at once; Spark has 2"):
        lgb_kind.fit(spec, base=data, report=print)
    assert time.monotonic() - start < 5
