"""kind: xgboost on real XGBoost: locally, and with xgboost.spark on the session's local[2]."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xgboost as xgb
from conftest import blobs

from corral.classic import xgboost as kind
from corral.classic.base import ClassicModel
from corral.errors import DataError, LaunchError, SpecError
from corral.spec import XGBoostSpec, parse_job


def parquet(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    """`x` as columns a, b, … and `y` as column y, in a Parquet file at `path`."""
    frame = pd.DataFrame(x, columns=[chr(ord("a") + i) for i in range(x.shape[1])])
    frame.assign(y=y).to_parquet(path)
    return str(path)


def job(tmp_path: Path, *, held_out: bool = True, **fields: Any) -> XGBoostSpec:
    """A job on three blobs (600 rows; 400 more to validate on), as a YAML file would say."""
    spec: dict[str, Any] = {
        "kind": "xgboost",
        "data": {"path": parquet(tmp_path / "train.parquet", *blobs(600)), "label": "y"},
        "rounds": 20,
        "params": {"max_depth": 3},
        **fields,
    }
    if held_out and "validation" not in spec:
        held = parquet(tmp_path / "val.parquet", *blobs(400, seed=1))
        spec["validation"] = {"path": held, "label": "y"}
    parsed = parse_job(spec)
    assert isinstance(parsed, XGBoostSpec)
    return parsed


def fit(spec: XGBoostSpec, base: Path) -> tuple[ClassicModel, dict[str, float], list[dict]]:
    rows: list[dict] = []
    kind.check(spec, base=base)
    model, metrics = kind.fit(spec, base=base, report=rows.append)
    return model, metrics, rows


def accuracy(model: ClassicModel, seed: int) -> float:
    x, y = blobs(400, seed=seed)
    return float((model.predict(x) == y).mean())


def test_local_fit_learns_blobs_and_reports_every_round(tmp_path):
    model, metrics, rows = fit(job(tmp_path), tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    assert {r["kind"] for r in rows} == {"epoch"} and rows[0]["epochs"] == 20
    assert {"loss", "train_mlogloss", "val_mlogloss", "val_accuracy"} <= set(rows[-1])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert metrics["val_accuracy"] > 0.9
    assert metrics["val_accuracy"] == pytest.approx(accuracy(model, seed=1), abs=1e-9)
    assert isinstance(model.estimator, xgb.XGBClassifier) and model.features == ["a", "b"]
    again = ClassicModel.load(model.save(tmp_path / "model.pkl"))  # the reporter is gone
    assert (again.predict(blobs(400, seed=1)[0]) == model.predict(blobs(400, seed=1)[0])).all()


def test_early_stopping_stops_before_the_rounds_and_keeps_the_best(tmp_path):
    rng = np.random.default_rng(0)  # labels of pure noise: validation loss soon only rises
    train = parquet(tmp_path / "noise.parquet", rng.normal(size=(300, 3)), rng.integers(0, 2, 300))
    held = parquet(tmp_path / "held.parquet", rng.normal(size=(300, 3)), rng.integers(0, 2, 300))
    spec = job(
        tmp_path,
        data={"path": train, "label": "y"},
        validation={"path": held, "label": "y"},
        rounds=200,
        early_stopping=3,
    )
    model, metrics, rows = fit(spec, tmp_path)
    assert len(rows) < 200 and metrics["rounds"] == len(rows)
    assert metrics["val_logloss"] == min(r["val_logloss"] for r in rows)
    assert len(rows) - 1 - 3 == model.estimator.best_iteration  # stopped 3 rounds past it


def test_a_report_that_raises_stops_the_training(tmp_path):
    spec = job(tmp_path, rounds=50)
    rows: list[dict] = []

    def pruner(row: dict) -> None:
        rows.append(row)
        if row["epoch"] == 3:
            raise RuntimeError("pruned at epoch 3")

    with pytest.raises(RuntimeError, match="pruned at epoch 3"):
        kind.fit(spec, base=tmp_path, report=pruner)
    assert len(rows) == 3


def test_regression(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.1 * rng.normal(size=500)
    data = {"path": parquet(tmp_path / "r.parquet", x[:400], y[:400]), "label": "y"}
    held = {"path": parquet(tmp_path / "rv.parquet", x[400:], y[400:]), "label": "y"}
    spec = job(tmp_path, task="regression", rounds=60, data=data, validation=held)
    model, metrics, rows = fit(spec, tmp_path)
    assert len(rows) == 60 and "val_rmse" in rows[0]
    assert metrics["val_rmse"] < 0.2 * y.std()
    predicted = model.predict(x[400:])
    assert predicted.dtype == np.float64
    assert np.sqrt(np.mean((predicted - y[400:]) ** 2)) == pytest.approx(metrics["val_rmse"])


def test_without_validation_the_training_accuracy_is_reported(tmp_path):
    _, metrics, _ = fit(job(tmp_path, held_out=False, rounds=5), tmp_path)
    assert metrics["train_accuracy"] > 0.9 and "val_accuracy" not in metrics


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"max_detph": 3},
            "params.max_detph: not a parameter of XGBoost; did you mean 'max_depth'?",
        ),
        ({"n_estimators": 10}, "params.n_estimators: set by corral from rounds"),
        ({"early_stopping_rounds": 5}, "params.early_stopping_rounds: set by corral from early"),
        ({"num_workers": 4}, "params.num_workers: set by corral from roles.worker.count"),
    ],
)
def test_params_are_checked_against_xgboost(tmp_path, params, message):
    with pytest.raises(SpecError) as caught:
        kind.check(job(tmp_path, held_out=False, params=params), base=tmp_path)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_native_names_and_aliases_are_parameters(tmp_path):
    native = {"eta": 0.1, "lambda": 2.0, "min_split_loss": 0.0, "max_leaves": 4, "rate_drop": 0}
    kind.check(job(tmp_path, held_out=False, params=native), base=tmp_path)


def test_labels_must_be_classes_from_zero(tmp_path):
    x, y = blobs(200)
    data = {"path": parquet(tmp_path / "shifted.parquet", x, y + 1), "label": "y"}
    with pytest.raises(DataError, match=r"data.label: .*0..k-1.* its values are 1, 2, 3"):
        fit(job(tmp_path, held_out=False, data=data), tmp_path)


def nan_data(tmp_path: Path, rows: int = 600, label: np.ndarray | None = None) -> dict[str, str]:
    """Blobs with missing features: a NaN (not a null: pandas would write one) in every
    tenth row's b, a null in a's row 3; `label` in place of their classes, if given."""
    x, y = blobs(rows)
    x[::10, 1] = np.nan
    columns = {
        "a": pa.array(x[:, 0], mask=np.arange(rows) == 3),
        "b": pa.array(x[:, 1], from_pandas=False),
        "y": pa.array(y if label is None else label, from_pandas=False),
    }
    pq.write_table(pa.table(columns), tmp_path / "nan.parquet")
    return {"path": str(tmp_path / "nan.parquet"), "label": "y"}


def test_nan_and_null_features_are_missing_values_that_xgboost_trains_on(tmp_path):
    model, metrics, _ = fit(job(tmp_path, held_out=False, data=nan_data(tmp_path)), tmp_path)
    assert metrics["train_accuracy"] > 0.9
    x, y = blobs(400, seed=1)
    x[:, 1] = np.nan  # with b missing, a alone still tells the blobs apart mostly
    assert (model.predict(x) == y).mean() > 0.6


def test_a_nan_label_is_a_data_error(tmp_path):
    y = np.where(np.arange(200) == 17, np.nan, blobs(200)[1])
    spec = job(tmp_path, held_out=False, data=nan_data(tmp_path, 200, label=y))
    with pytest.raises(DataError) as caught:
        fit(spec, tmp_path)
    assert str(caught.value).startswith("label 'y' contains 1 NaN/inf values (first at row 17)")
    assert "\n" not in str(caught.value)


# -- on Spark: the session's local[2]


def spark_job(tmp_path: Path, **fields: Any) -> XGBoostSpec:
    fields.setdefault("roles", {"worker": {"count": 2}})
    return job(tmp_path, engine="spark", spark={"master": "local[2]"}, **fields)


@pytest.mark.spark
@pytest.mark.slow
def test_spark_fit_with_two_workers(spark, tmp_path):
    spec = spark_job(tmp_path, rounds=40, early_stopping=5)
    model, metrics, rows = fit(spec, tmp_path)
    assert isinstance(model.estimator, xgb.XGBClassifier)  # plain: it predicts without Spark
    assert rows and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert {"loss", "val_mlogloss", "val_accuracy"} <= set(rows[-1])
    assert metrics["val_accuracy"] > 0.9
    # XGBoost's own distributed evaluation of the kept round, and the returned model's
    # predictions on NumPy, agree on every one of the 400 rows' count
    assert metrics["val_accuracy"] == pytest.approx(accuracy(model, seed=1), abs=1e-9)


@pytest.mark.spark
@pytest.mark.timeout(120)
def test_spark_refuses_more_workers_than_slots_at_once(spark, tmp_path):
    spec = spark_job(tmp_path, roles={"worker": {"count": 3}})
    start = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        kind.fit(spec, base=tmp_path, report=lambda row: None)
    assert time.monotonic() - start < 20
    assert str(caught.value) == (
        "the job needs 3 task slots at once; Spark has 2: add cores or lower roles.worker.count"
    )


@pytest.mark.spark
def test_spark_trains_on_nan_and_null_features_as_missing_values(spark, tmp_path):
    model, metrics, _ = fit(spark_job(tmp_path, held_out=False, data=nan_data(tmp_path)), tmp_path)
    assert metrics["train_accuracy"] > 0.9 and accuracy(model, seed=1) > 0.9


@pytest.mark.spark
@pytest.mark.parametrize(
    ("labels", "task", "message"),
    [
        ("nan", "classification", "data: label column y has 1 NaN value(s) in 200 rows"),
        ("nan", "regression", "data: label column y has 1 NaN value(s) in 200 rows"),
        ("null", "classification", "data: label column y has 1 null value(s) in 200 rows"),
        (
            "shifted",
            "classification",
            "data.label: classification needs classes 0..k-1 (at least two); "
            "its values are 1, 2, 3",
        ),
        (
            "gap",
            "classification",
            "data.label: classification needs classes 0..k-1 (at least two); its values are 0, 2",
        ),
        (
            "many",
            "classification",
            "data.label: y has over 1000 distinct values, which are not classes 0..k-1; "
            "is it task: regression?",
        ),
    ],
)
def test_spark_labels_are_checked_in_one_line(spark, tmp_path, labels, task, message):
    rows = 2000 if labels == "many" else 200
    y, seventeenth = blobs(rows)[1], np.arange(rows) == 17
    column = {
        "nan": np.where(seventeenth, np.nan, y),
        "null": pa.array(y, mask=seventeenth),
        "shifted": y + 1,
        "gap": np.where(y == 1, 2, y),
        "many": np.arange(rows),
    }[labels]
    data = nan_data(tmp_path, rows, label=column)  # with missing features, which pass
    spec = spark_job(tmp_path, held_out=False, data=data, task=task)
    with pytest.raises(DataError) as caught:
        kind.fit(spec, base=tmp_path, report=lambda row: None)
    assert str(caught.value) == message


@pytest.mark.spark
def test_spark_validation_labels_must_be_training_classes(spark, tmp_path):
    x, y = blobs(200, seed=1)
    held = {"path": parquet(tmp_path / "v.parquet", x, np.where(y == 2, 5, y)), "label": "y"}
    with pytest.raises(DataError) as caught:
        fit(spark_job(tmp_path, validation=held), tmp_path)
    assert str(caught.value) == "validation.label: values 5 are not among the classes 0..2"


@pytest.mark.spark
def test_spark_refuses_a_classifier_objective(tmp_path):
    spec = spark_job(tmp_path, held_out=False, params={"objective": "multi:softmax"})
    with pytest.raises(SpecError, match=r"params\.objective: xgboost\.spark sets"):
        kind.check(spec, base=tmp_path)
