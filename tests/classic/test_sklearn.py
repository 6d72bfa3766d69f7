"""``kind: sklearn``: real scikit-learn fits and searches, spread over real loky worker
processes and, through joblib-spark, over a real local[2] Spark session."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import blobs

from corral.classic import fit as fit_job
from corral.classic.base import ClassicModel
from corral.classic.sklearn import _distribution, check, fit
from corral.errors import DataError, LaunchError, SpecError
from corral.spec import Distribution, SklearnSpec

TREE = "sklearn.tree:DecisionTreeClassifier"
LOGISTIC = "sklearn.linear_model:LogisticRegression"

#: A user's own estimator: nearest centroid, its centroids pulled to the origin by
#: `shrink`; each fit leaves a file named after the process that ran it in `pids`, holding
#: the `n_jobs` it was given.
CENTROID = """
import os, time
from pathlib import Path
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

class Centroid(ClassifierMixin, BaseEstimator):
    def __init__(self, shrink=0.0, pids=None, n_jobs=None):
        self.shrink, self.pids, self.n_jobs = shrink, pids, n_jobs

    def fit(self, x, y):
        if self.pids:
            Path(self.pids, str(os.getpid())).write_text(str(self.n_jobs))
            time.sleep(0.2)  # long enough that both workers get a fold
        self.classes_ = np.unique(y)
        means = np.stack([x[y == k].mean(0) for k in self.classes_])
        self.centroids_ = means * (1 - self.shrink)
        return self

    def predict(self, x):
        distances = ((x[:, None, :] - self.centroids_) ** 2).sum(-1)
        return self.classes_[distances.argmin(1)]
"""


def write(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y}).to_parquet(path)
    return str(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three blobs, for training (train.parquet) and validation (val.parquet), and the
    user's estimator (centroid.py)."""
    write(tmp_path / "train.parquet", *blobs(300, seed=0))
    write(tmp_path / "val.parquet", *blobs(200, seed=1))
    (tmp_path / "centroid.py").write_text(textwrap.dedent(CENTROID))
    return tmp_path


def job(estimator: str = TREE, **fields) -> SklearnSpec:
    return SklearnSpec.model_validate(
        {
            "kind": "sklearn",
            "estimator": estimator,
            "data": {"path": "train.parquet", "label": "y"},
            **fields,
        }
    )


def accuracy(model: ClassicModel, path: Path) -> float:
    frame = pd.read_parquet(path)
    return float((model.predict(frame[["a", "b"]].to_numpy()) == frame["y"]).mean())


def test_plain_fit_saves_a_model_and_reports_one_epoch_row(folder, tmp_path):
    spec = job(params={"max_depth": 4}, validation={"path": "val.parquet", "label": "y"}, seed=7)
    result = fit_job(spec, base=folder, out=tmp_path / "out")
    model = ClassicModel.load(result.path)
    assert model.kind == "sklearn" and model.classifier and model.features == ["a", "b"]
    assert model.estimator.max_depth == 4 and model.estimator.random_state == 7  # the job's seed
    assert model.predict(np.zeros((1, 2), np.float32)).dtype == np.int64
    assert accuracy(model, folder / "val.parquet") > 0.9
    assert result.history == [{"kind": "epoch", "epoch": 1, "epochs": 1, **result.metrics}]
    assert set(result.metrics) == {"val_accuracy"} and result.metrics["val_accuracy"] > 0.9


def test_a_regressor_reports_r2_on_its_training_data(folder):
    rows: list[dict] = []
    model, metrics = fit(job("sklearn.linear_model:Ridge"), base=folder, report=rows.append)
    assert not model.classifier and model.predict(np.zeros((1, 2))).dtype == np.float64
    assert list(metrics) == ["train_r2"] and 0 < metrics["train_r2"] < 1
    assert rows == [{"kind": "epoch", "epoch": 1, "epochs": 1, "train_r2": metrics["train_r2"]}]


@pytest.mark.slow
def test_a_grid_search_on_two_loky_workers_picks_the_deep_tree(folder):
    rows: list[dict] = []
    spec = job(
        search={"space": {"max_depth": [1, 5]}, "cv": 3},
        roles={"worker": {"count": 2}},
        validation={"path": "val.parquet", "label": "y"},
    )
    model, metrics = fit(spec, base=folder, report=rows.append)
    assert model.estimator.max_depth == 5  # one split cannot tell three blobs apart
    assert metrics["cv_score"] > 0.9 and metrics["val_accuracy"] > 0.9
    assert accuracy(model, folder / "val.parquet") == metrics["val_accuracy"]
    assert len(rows) == 1 and rows[-1]["epoch"] == spec.epochs == 1


@pytest.mark.slow
def test_the_users_own_estimator_fits_in_worker_processes(folder, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = job(
        "centroid.py:Centroid",
        params={"pids": str(pids)},
        search={"space": {"shrink": [0.0, 0.9]}, "cv": 2},
        roles={"worker": {"count": 2}},
    )
    model, metrics = fit(spec, base=folder, report=lambda row: None)
    assert type(model.estimator).__name__ == "Centroid" and model.estimator.shrink == 0.0
    assert metrics["train_accuracy"] > 0.9
    n_jobs = {int(p.name): p.read_text() for p in pids.iterdir()}
    assert n_jobs.pop(os.getpid()) == "2"  # the refit, on the driver: all the job's CPUs
    assert list(n_jobs.values()) == ["1", "1"]  # the folds' fits, on two workers of 1 CPU
    assert model.estimator.n_jobs is None  # to predict with, one thread


@pytest.mark.slow
def test_a_random_search_draws_c_on_a_log_scale(folder):
    spec = job(
        LOGISTIC,
        search={
            "kind": "random",
            "space": {"C": {"low": 1e-6, "high": 10.0, "log": True}},
            "n_iter": 6,
            "seed": 3,
        },
    )
    model, metrics = fit(spec, base=folder, report=lambda row: None)
    assert 1e-6 <= model.estimator.C <= 10.0
    assert metrics["cv_score"] > 0.9 and metrics["train_accuracy"] > 0.9
    again, _ = fit(spec, base=folder, report=lambda row: None)
    assert again.estimator.C == model.estimator.C  # search.seed fixes the draws


def test_ranges_are_drawn_as_the_spec_says():
    rng = np.random.default_rng(0)
    log = _distribution(Distribution(low=1e-6, high=1.0, log=True))
    assert np.median([log.rvs(random_state=rng) for _ in range(400)]) < 1e-2  # uniform: ~0.5
    for d in (
        Distribution(low=1, high=3, type="int"),
        Distribution(low=1, high=3, type="int", log=True),
    ):
        drawn = {_distribution(d).rvs(random_state=rng) for _ in range(200)}
        assert drawn == {1, 2, 3}  # both ends included


@pytest.mark.slow
@pytest.mark.spark
def test_a_grid_search_on_spark_picks_what_the_local_one_picks(spark, folder):
    # the user's own class must reach Spark's Python workers too: pyspark pickles with
    # its own copy of cloudpickle
    fields = {
        "search": {"space": {"shrink": [0.0, 0.9]}, "cv": 2},
        "roles": {"worker": {"count": 2}},
    }
    local, local_metrics = fit(job("centroid.py:Centroid", **fields), base=folder, report=print)
    on_spark, spark_metrics = fit(
        job("centroid.py:Centroid", engine="spark", **fields), base=folder, report=print
    )
    assert on_spark.estimator.shrink == local.estimator.shrink == 0.0
    assert spark_metrics == local_metrics and spark_metrics["cv_score"] > 0.9


@pytest.mark.spark
def test_a_class_spark_workers_cannot_import_is_refused_in_one_line(spark, folder):
    # a module beside the job imports on the driver (and in loky workers), not on Spark's
    (folder / "beside.py").write_text(textwrap.dedent(CENTROID))
    spec = job("beside:Centroid", engine="spark", search={"space": {"shrink": [0.0, 0.9]}, "cv": 2})
    with pytest.raises(LaunchError) as caught:
        fit(spec, base=folder, report=lambda row: None)
    assert str(caught.value) == (
        "estimator: Spark's workers cannot load Centroid: "
        "ModuleNotFoundError: No module named 'beside'"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"estimator": "sklearn.ensemble:RandomForestClassifier", "params": {"max_detph": 3}},
            "params.max_detph: not a parameter of RandomForestClassifier; "
            "did you mean 'max_depth'?",
        ),
        (
            {"search": {"space": {"max_dept": [1, 2]}}},
            "search.space.max_dept: not a parameter of DecisionTreeClassifier; "
            "did you mean 'max_depth'?",
        ),
        (
            {"search": {"space": {"max_depth": [1, 2]}, "scoring": "acuracy"}},
            "search.scoring: 'acuracy' is not a scikit-learn scorer; did you mean 'accuracy'?",
        ),
        ({"params": {"n_jobs": 4}}, "params.n_jobs: corral sets it; set roles.worker.count"),
        (
            {"params": {"max_depth": 0}},
            "params: The 'max_depth' parameter of DecisionTreeClassifier must be",
        ),
        (
            {"estimator": LOGISTIC, "search": {"space": {"C": [1.0, 0]}}},
            "search.space.C: The 'C' parameter of LogisticRegression must be",
        ),
        (
            {"estimator": "sklearn.tree:NoSuchTree"},
            "estimator: 'sklearn.tree' has no attribute 'NoSuchTree'",
        ),
        ({"estimator": "no_such_module:Tree"}, "estimator: cannot import module 'no_such_module'"),
        (
            {"estimator": "collections:OrderedDict"},
            "estimator: 'collections:OrderedDict' is not a scikit-learn estimator class",
        ),
        (
            {"estimator": "centroid.py:Centroid", "params": {"shrnk": 0.5}},
            "params.shrnk: not a parameter of Centroid; did you mean 'shrink'?",
        ),
    ],
)
def test_check_refuses_in_one_line(folder, fields, message):
    spec = job(**{"estimator": TREE, **fields})
    with pytest.raises(SpecError) as caught:
        check(spec, base=folder)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_check_passes_a_good_spec(folder):
    check(
        job(
            LOGISTIC,
            params={"max_iter": 200},
            search={
                "kind": "random",
                "space": {"C": {"low": 1e-3, "high": 1.0}},
                "scoring": "f1_macro",
            },
        ),
        base=folder,
    )


def test_a_continuous_label_for_a_classifier_is_a_data_error_in_one_line(folder, tmp_path):
    x, y = blobs(100)
    write(folder / "floats.parquet", x, y + 0.5)
    spec = job(data={"path": "floats.parquet", "label": "y"})
    with pytest.raises(
        DataError, match=r"^DecisionTreeClassifier.fit: Unknown label type"
    ) as caught:
        fit(spec, base=folder, report=lambda row: None)
    assert "\n" not in str(caught.value)
