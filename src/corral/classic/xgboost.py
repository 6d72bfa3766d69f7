"""``kind: xgboost``: gradient-boosted trees with XGBoost (Chen and Guestrin, "XGBoost: A
Scalable Tree Boosting System", KDD 2016).

On Spark the job is ``xgboost.spark``: one barrier stage of ``roles.worker.count`` tasks,
each training on its share of the rows and all-reducing histograms with the others. Each
task uses ``spark.task.cpus`` threads (xgboost.spark's rule, not ``roles.worker.cpus``).
Locally it is one process with ``count x cpus`` threads. On both, null and NaN features
are XGBoost's missing values (trees learn which way they go), so they are neither refused
nor, on Spark, even looked for; a null or NaN label is refused in one line.

Every boosting round becomes an epoch row (`corral.classic.base.epoch_row`): ``loss`` is
the training value of the metric XGBoost watches (the last of ``eval_metric``, else the
objective's own, the one early stopping watches), and every metric XGBoost evaluates is
there as ``train_<metric>`` and ``val_<metric>``. So that a classifier reports
``val_accuracy`` (a regressor ``val_rmse``) without another pass over the data, corral
puts ``error``/``merror`` (``rmse``) first in the metrics XGBoost evaluates each round,
which leaves the watched metric as it was. Locally each row is reported as its round ends
(a pruner that raises stops the training); Spark sends the rounds back only at the end.
"""

from __future__ import annotations

import functools
import json
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xgboost as xgb

from corral.classic.base import ClassicModel, Report, check_names, epoch_row, read_arrays
from corral.errors import DataError, LaunchError, SpecError
from corral.spec import DataSpec, XGBoostSpec

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import Column, DataFrame, Row, SparkSession

#: Parameters corral sets from a field of the spec (or, for num_class, from the labels).
_SET_BY_CORRAL = {
    "n_estimators": "rounds",
    "num_boost_round": "rounds",
    "early_stopping_rounds": "early_stopping",
    "n_jobs": "roles.worker.cpus (on Spark, spark.task.cpus)",
    "nthread": "roles.worker.cpus (on Spark, spark.task.cpus)",
    "num_workers": "roles.worker.count",
    "random_state": "seed",
    "seed": "seed",
    "num_class": "the labels (classes 0..k-1)",
    "callbacks": "nothing a spec can say (corral reports every round itself)",
}
#: The column that tells xgboost.spark which rows of the union are validation rows.
_VALIDATION = "_corral_validation"
#: What MLflow refuses in a metric's name (``tweedie-nloglik@1.5``'s ``@``).
_UNSAFE = re.compile(r"[^\w\-. :/]")
#: Distinct label values past which a classification's labels are not classes.
_MAX_CLASSES = 1000


def check(spec: XGBoostSpec, *, base: Path) -> None:
    """Refuse `params` that XGBoost does not know (naming the closest one it does), that
    corral sets from a spec field, or that xgboost.spark refuses, before anything runs.

    Raises:
        SpecError: in one line, naming the parameter.
    """
    for name in spec.params:
        if name in _SET_BY_CORRAL:
            raise SpecError(f"params.{name}: set by corral from {_SET_BY_CORRAL[name]}")
    check_names(spec.params, known_parameters(), where="params", library="XGBoost")
    if spec.engine != "spark":
        return
    if "objective" in spec.params and spec.task == "classification":
        raise SpecError(
            "params.objective: xgboost.spark sets a classifier's objective from its labels "
            "(binary:logistic or multi:softprob); remove it"
        )
    try:
        _spark_estimator(spec.task)(**spec.params)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise SpecError(f"params: xgboost.spark refuses them: {exc}") from None


@functools.cache
def known_parameters() -> frozenset[str]:
    """The parameter names XGBoost accepts: its scikit-learn estimators' own, and every
    name XGBoost records in a booster's configuration, for each booster, tree method and
    objective that has parameters of its own (aliases such as ``eta`` included).

    Asked of the installed XGBoost (a few one-round trainings on two rows, once per
    process), so the list is that version's, not a copy that ages.
    """
    names = set(xgb.XGBClassifier().get_params()) | set(xgb.XGBRegressor().get_params())
    data = xgb.DMatrix(np.array([[0.0], [1.0]]), label=[0.0, 1.0])
    for params in (
        {"tree_method": "hist"},
        {"tree_method": "exact"},
        {"booster": "dart"},
        {"booster": "gblinear", "updater": "shotgun"},
        {"booster": "gblinear", "updater": "coord_descent"},
        {"objective": "reg:pseudohubererror"},
        {"objective": "reg:quantileerror", "quantile_alpha": 0.5},
        {"objective": "reg:tweedie"},
    ):
        booster = xgb.train({**params, "verbosity": 0, "nthread": 1}, data, 1)
        names |= _config_names(json.loads(booster.save_config()))
    return frozenset(names)


def _config_names(node: Any, inside: str = "") -> set[str]:
    """The keys of every ``*_param`` section of a booster's configuration."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and inside.endswith("_param"):
                found.add(key)
            found |= _config_names(value, key)
    elif isinstance(node, list):
        for item in node:
            found |= _config_names(item, inside)
    return found


def fit(spec: XGBoostSpec, *, base: Path, report: Report) -> tuple[ClassicModel, dict[str, float]]:
    """Train as `spec` says, reporting one epoch row per boosting round.

    Returns the model (its estimator a plain `xgboost.XGBClassifier` or `XGBRegressor`,
    which predicts on NumPy without Spark) and the metrics of the round it keeps (the
    best one, with early stopping), with ``rounds``: how many it trained.
    """
    fitted, rows, names = (_fit_spark if spec.engine == "spark" else _fit_local)(spec, base, report)
    best = fitted.get_booster().attr("best_iteration")
    kept = rows[int(best) if best is not None else -1]
    metrics = {k: v for k, v in kept.items() if k not in ("kind", "epoch", "epochs")}
    model = ClassicModel(
        estimator=fitted, features=names, classifier=spec.task == "classification", kind="xgboost"
    )
    return model, {**metrics, "rounds": float(len(rows))}


# -- labels and metrics, the same on both engines


def _classes(values: np.ndarray, where: str) -> int:
    """How many classes the distinct label `values` (sorted) are; refuses anything but
    the integers 0..k-1, k >= 2, which is what XGBoost's classifiers take."""
    k = len(values)
    if k < 2 or not np.array_equal(values, np.arange(k)):
        shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if k > 10 else "")
        raise DataError(
            f"{where}: classification needs classes 0..k-1 (at least two); its values are {shown}"
        )
    return k


def _within(values: np.ndarray, classes: int, where: str) -> None:
    """Refuse validation labels that are not among the training classes."""
    bad = [v for v in values if v not in range(classes)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10])
        raise DataError(f"{where}: values {shown} are not among the classes 0..{classes - 1}")


def _eval_metrics(spec: XGBoostSpec, classes: int) -> list[str]:
    """The metrics XGBoost is to evaluate each round: the accuracy one (``error``,
    ``merror`` or ``rmse``) first, then those it would have evaluated anyway, so that the
    last, which early stopping watches, stays the same."""
    given = spec.params.get("eval_metric")
    objective = spec.params.get("objective")
    if spec.task == "regression":
        objective, extra = objective or "reg:squarederror", "rmse"
    else:
        objective = objective or ("multi:softprob" if classes > 2 else "binary:logistic")
        extra = "merror" if objective.startswith("multi:") else "error"
    if given is None:
        metrics = _default_metrics(spec.params, objective, classes)
    else:
        metrics = [given] if isinstance(given, str) else list(given)
    return metrics if extra in metrics else [extra, *metrics]


def _default_metrics(params: dict[str, Any], objective: str, classes: int) -> list[str]:
    """The metrics XGBoost evaluates when told none. Only XGBoost knows each objective's
    (``tweedie-nloglik@1.5`` depends on a parameter), so a one-row booster is asked."""
    probe = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}
    probe |= {"objective": objective, "verbosity": 0, "nthread": 1}
    if objective.startswith("multi:"):
        probe["num_class"] = classes
    data = xgb.DMatrix(np.ones((1, 1)), label=[1.0])
    with warnings.catch_warnings():  # the trees' parameters go unused here
        warnings.simplefilter("ignore")
        line = xgb.Booster(probe, [data]).eval(data, "probe")
    return [item.rsplit(":", 1)[0].removeprefix("probe-") for item in line.split("\t")[1:]]


def _round(train: dict[str, float], val: dict[str, float] | None) -> dict[str, float]:
    """One round's metrics under corral's names (see the module's docstring); the last
    training metric is the watched one, XGBoost's order being that of ``eval_metric``."""
    row = {"loss": list(train.values())[-1]}
    for split, values in (("train", train), ("val", val or {})):
        for metric, value in values.items():
            row[f"{split}_{_UNSAFE.sub('_', metric)}"] = value
            if metric in ("error", "merror"):
                row[f"{split}_accuracy"] = 1.0 - value
    return row


def _estimator(spec: XGBoostSpec, metrics: list[str], **extra: Any) -> xgb.XGBModel:
    """The scikit-learn-API model of the spec's task, with the spec's parameters."""
    cls = xgb.XGBClassifier if spec.task == "classification" else xgb.XGBRegressor
    params = {**spec.params, "eval_metric": metrics}
    return cls(n_estimators=spec.rounds, random_state=spec.seed, **params, **extra)


# -- locally: one process, a thread per CPU of every worker


class _Reporter(xgb.callback.TrainingCallback):
    """Reports each round as it ends; an exception from `report` (a pruner's decision)
    ends the training."""

    def __init__(self, report: Report, rounds: int) -> None:
        super().__init__()
        self.report, self.rounds = report, rounds
        self.rows: list[dict[str, Any]] = []

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        train, *val = ({m: v[-1] for m, v in log.items()} for log in evals_log.values())
        row = epoch_row(epoch + 1, self.rounds, _round(train, val[0] if val else None))
        self.rows.append(row)
        self.report(row)
        return False


def _fit_local(
    spec: XGBoostSpec, base: Path, report: Report
) -> tuple[xgb.XGBModel, list[dict[str, Any]], list[str]]:
    x, y, names = read_arrays(spec.data, base, missing_features=True)
    _one_per_column(x.shape[1], names, "data")
    evals = [(x, y)]
    if spec.validation is not None:
        held = spec.validation.model_copy(update={"features": spec.validation.features or names})
        xv, yv, _ = read_arrays(held, base, missing_features=True)
        evals.append((xv, yv))
    classes = 0
    if spec.task == "classification":
        classes = _classes(np.unique(y), "data.label")
        if spec.validation is not None:
            _within(np.unique(evals[1][1]), classes, "validation.label")
    reporter = _Reporter(report, spec.rounds)
    workers = spec.roles.worker
    fitted = _estimator(
        spec,
        _eval_metrics(spec, classes),
        n_jobs=workers.count * workers.cpus,
        early_stopping_rounds=spec.early_stopping,
        callbacks=[reporter],
    )
    fitted.fit(x, y, eval_set=evals, verbose=False)
    # the reporter holds the job's report, which does not pickle; not set_params(), which
    # hands the booster eval_metric's list as one string, and predict() then fails on it
    fitted.callbacks = None
    return fitted, reporter.rows, names


def _one_per_column(width: int, names: list[str], where: str) -> None:
    """Refuse array columns: a classic model takes one number per feature column."""
    if width != len(names):
        raise DataError(
            f"{where}.features: kind xgboost takes one number per column; "
            f"{len(names)} column(s) give {width} inputs"
        )


# -- on Spark: xgboost.spark, one barrier stage of a task per worker


def _spark_estimator(task: str) -> Any:
    try:
        from xgboost.spark import SparkXGBClassifier, SparkXGBRegressor
    except ImportError:
        raise SpecError("engine: spark needs pyspark: pip install 'corral[spark]'") from None
    return SparkXGBClassifier if task == "classification" else SparkXGBRegressor


def _fit_spark(
    spec: XGBoostSpec, base: Path, report: Report
) -> tuple[xgb.XGBModel, list[dict[str, Any]], list[str]]:
    from pyspark.sql import functions as F

    from corral.engines.spark import session

    spark = session(spec.spark.master, spec.spark.conf)
    workers = spec.roles.worker.count
    _check_slots(spark.sparkContext, workers)
    label, classification = spec.data.label, spec.task == "classification"
    df, names, found = _read(
        spark, spec.data, base, spec.data.features, workers, "data", labels=classification
    )
    classes = _spark_classes(df, label, found) if classification else 0
    extra: dict[str, Any] = {}
    if spec.validation is not None:
        features = spec.validation.features or names
        val, _, found = _read(
            spark, spec.validation, base, features, 1, "validation", labels=classification
        )
        if classification:
            _spark_within(val, spec.validation.label, found, classes)
        val = val.withColumnRenamed(spec.validation.label, label)
        df = df.withColumn(_VALIDATION, F.lit(False)).unionByName(
            val.withColumn(_VALIDATION, F.lit(True))
        )
        extra = {
            "validation_indicator_col": _VALIDATION,
            "early_stopping_rounds": spec.early_stopping,
            # a union of as many partitions as workers is not reshuffled unless forced,
            # and a task given no validation rows breaks the stage
            "force_repartition": True,
        }
    metrics = _eval_metrics(spec, classes)
    estimator = _spark_estimator(spec.task)(
        features_col=names,
        label_col=label,
        num_workers=workers,
        n_estimators=spec.rounds,
        random_state=spec.seed,
        verbose=False,
        **{**spec.params, "eval_metric": metrics},
        **extra,
    )
    trained = estimator.fit(df)
    summary = trained.training_summary
    train, val = summary.train_objective_history, summary.validation_objective_history
    rows = [
        epoch_row(
            i + 1,
            spec.rounds,
            _round({m: v[i] for m, v in train.items()}, {m: v[i] for m, v in val.items()}),
        )
        for i in range(len(next(iter(train.values()))))
    ]
    for row in rows:
        report(row)
    fitted = _estimator(spec, metrics)
    fitted.load_model(bytearray(trained.get_booster().save_raw("json")))
    return fitted, rows, names


def _check_slots(sc: SparkContext, needed: int) -> None:
    """Refuse to start a stage the cluster cannot run at once: xgboost.spark only logs a
    warning, and the barrier stage then waits for slots for minutes."""
    from corral.engines.spark import _SLOTS_WAIT_S, task_slots

    deadline = time.monotonic() + _SLOTS_WAIT_S
    slots = task_slots(sc)
    while slots == 0 and time.monotonic() < deadline:  # no executor has registered yet
        time.sleep(0.5)
        slots = task_slots(sc)
    if slots < needed:
        raise LaunchError(
            f"the job needs {needed} task slots at once; Spark has {slots}: "
            "add cores or lower roles.worker.count"
        )


def _read(
    spark: SparkSession,
    data: DataSpec,
    base: Path,
    features: list[str] | None,
    workers: int,
    where: str,
    *,
    labels: bool,
) -> tuple[DataFrame, list[str], Row]:
    """The Parquet data at `data.path` (relative to `base`, unless absolute or a URI),
    narrowed to its feature and label columns and checked in one Spark job; the feature
    names; and that job's row, with `_label_aggregates` if `labels`.

    Null and NaN features are XGBoost's missing values, so they are not looked for (the
    job then reads only the label column, and array ones); a null or NaN label is refused.
    """
    from pyspark.errors import AnalysisException

    from corral.spark import prepare_input

    path = data.path if "://" in data.path else str(base / data.path)  # base / "/a" is "/a"
    try:
        prepared = prepare_input(
            spark.read.parquet(path), features, data.label, missing_features=True
        )
        width, row = prepared.check(workers, *(_label_aggregates(data.label) if labels else []))
    except AnalysisException as exc:
        raise DataError(f"{where}.path: cannot read {path}: {str(exc).splitlines()[0]}") from None
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    _one_per_column(width, prepared.features, where)
    return prepared.df, prepared.features, row


def _label_aggregates(label: str) -> list[Column]:
    """What tells whether a label's values are classes 0..k-1 without collecting them:
    ``_others``, the rows whose label is no integer from 0; ``_top``, the largest label;
    ``_distinct``, how many labels there are. With no others, ``_distinct == _top + 1``
    says the labels are 0.._top, each present. Plain aggregates, so Spark compiles the
    whole job (a ``collect_set`` of the labels, interpreted, cost ~0.2 s more at 200k rows).
    """
    from pyspark.sql import functions as F

    y = F.col(label).cast("double")
    return [
        F.sum((~((y >= 0) & (y == F.floor(y)))).cast("int")).alias("_others"),
        F.max(y).alias("_top"),
        F.countDistinct(label).alias("_distinct"),
    ]


def _spark_classes(df: DataFrame, label: str, found: Row) -> int:
    """How many classes the training labels are, from `_label_aggregates` in `found`,
    checked as `_classes` checks them; more than `_MAX_CLASSES` labels are no classes.
    Labels that are not 0..k-1 take a second job, for the message to show them."""
    distinct = found["_distinct"]
    if distinct > _MAX_CLASSES:
        raise DataError(
            f"data.label: {label} has over {_MAX_CLASSES} distinct values, which are not "
            "classes 0..k-1; is it task: regression?"
        )
    if not found["_others"] and distinct == found["_top"] + 1:
        return _classes(np.arange(distinct), "data.label")  # refuses one class
    return _classes(_distinct_labels(df, label), "data.label")


def _spark_within(df: DataFrame, label: str, found: Row, classes: int) -> None:
    """Refuse validation labels that are not among the training classes (`_within`),
    from `_label_aggregates` in `found`; a second job collects them for the message."""
    if found["_others"] or found["_top"] >= classes:
        _within(_distinct_labels(df, label), classes, "validation.label")


def _distinct_labels(df: DataFrame, label: str) -> np.ndarray:
    """A label's distinct values, sorted, in a Spark job that collects at most
    `_MAX_CLASSES` + 1 of them."""
    found = df.select(label).distinct().limit(_MAX_CLASSES + 1).collect()
    return np.array(sorted(r[0] for r in found))
