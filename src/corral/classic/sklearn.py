"""``kind: sklearn``: a scikit-learn estimator, fitted as it is or chosen by a
cross-validated search (``GridSearchCV`` or ``RandomizedSearchCV``) whose fits run on the
job's workers.

scikit-learn fits on one machine, so the data is read whole into the driver. What spreads
is a search: each (candidate, fold) fit is a joblib task, run by ``roles.worker.count`` loky
worker processes (``engine: local``) or as that many concurrent Spark tasks through
joblib-spark (``engine: spark``). A task sends back its fold's scores and timings, never a
fitted estimator (the searches call ``_fit_and_score`` without ``return_estimator``;
``return_train_score`` would only add scores), so joblib-spark's known failure on large
task results (``spark.driver.maxResultSize``) cannot happen; the data does travel *to*
every task, which is why it must fit the driver anyway. The best candidate is then refitted
on the driver, outside the Spark backend, so that an estimator with its own joblib
parallelism (a forest's trees) does not turn its parts into Spark task results either.

The job reports one row, epoch 1 of 1 (a search pruner reads its ``epoch`` rows, and a
search has no rounds to prune between): ``cv_score`` for a search, and the validation
(``val_``) or, without validation data, the training (``train_``) score under the search's
scorer, or accuracy or R² by default.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corral.classic.base import ClassicModel, Report, check_names, epoch_row, read_arrays
from corral.entrypoints import load_callable
from corral.errors import DataError, LaunchError, SpecError
from corral.spec import DataSpec, Distribution, SklearnSearch, SklearnSpec

log = logging.getLogger("corral")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of `exc`'s message (scikit-learn's run to paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _estimator_class(spec: SklearnSpec, base: Path) -> type:
    """The class `spec.estimator` names, refused unless it fits, predicts and has
    scikit-learn's parameters (``get_params``/``set_params``, which a search needs)."""
    cls = load_callable(spec.estimator, base=base, what="estimator")
    needs = ("fit", "predict", "get_params", "set_params")
    if not isinstance(cls, type) or not all(hasattr(cls, name) for name in needs):
        raise SpecError(
            f"estimator: '{spec.estimator}' is not a scikit-learn estimator class "
            "(a class with fit, predict, get_params and set_params)"
        )
    return cls


def _param_names(cls: type) -> list[str]:
    """The constructor's parameters, which scikit-learn requires to be its ``get_params``
    keys (found without constructing it: a typo must be named, not raise a TypeError)."""
    signature = inspect.signature(cls)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def _params(spec: SklearnSpec, cls: type) -> dict[str, Any]:
    """The constructor's arguments: `spec.params`, with the job's ``seed`` as
    ``random_state`` where the estimator takes one and the user set none, so that a job
    fits the same model each time it runs."""
    params = dict(spec.params)
    if "random_state" in _param_names(cls) and "random_state" not in params:
        params["random_state"] = spec.seed
    return params


def _validate(estimator: Any, where: str) -> None:
    """Check `estimator`'s parameter values as its ``fit`` would, now (``C: 0`` would
    otherwise fail a search minutes in). Uses scikit-learn's ``_validate_params``, where
    the class has it: there is no public way to ask."""
    validate = getattr(estimator, "_validate_params", None)
    if validate is None:
        return
    try:
        validate()
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: {_first_line(exc)}") from None


def _check_scoring(scoring: str) -> None:
    from sklearn.metrics import get_scorer_names

    known = get_scorer_names()
    if scoring not in known:
        near = difflib.get_close_matches(scoring, known, 1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise SpecError(f"search.scoring: '{scoring}' is not a scikit-learn scorer{hint}")


def _check_search(search: SklearnSearch, estimator: Any, library: str) -> None:
    """Refuse a space naming what the estimator lacks, or values it would refuse."""
    from sklearn.base import clone

    if "n_jobs" in search.space:
        raise SpecError("search.space.n_jobs: corral sets it; set roles.worker.count")
    check_names(
        search.space, estimator.get_params(deep=True), where="search.space", library=library
    )
    for name, values in search.space.items():
        if isinstance(values, Distribution):
            cast = int if values.type == "int" else float
            values = [cast(values.low), cast(values.high)]
        for value in values:
            _validate(clone(estimator).set_params(**{name: value}), f"search.space.{name}")
    if search.scoring is not None:
        _check_scoring(search.scoring)


def check(spec: SklearnSpec, *, base: Path) -> None:
    """Refuse what would fail the job once started: an estimator that cannot be imported
    or is no estimator, parameters or search keys it does not take, values it refuses, a
    scorer scikit-learn does not know, and ``n_jobs``, which the workers decide.

    Raises:
        SpecError: in one line, naming the field (and the closest name, for a typo).
    """
    cls = _estimator_class(spec, base)
    if "n_jobs" in spec.params:
        raise SpecError("params.n_jobs: corral sets it; set roles.worker.count")
    check_names(spec.params, _param_names(cls), where="params", library=cls.__name__)
    try:
        estimator = cls(**_params(spec, cls))
    except Exception as exc:
        raise SpecError(f"estimator: {cls.__name__}(**params) failed: {_first_line(exc)}") from None
    _validate(estimator, "params")
    if spec.search is not None:
        _check_search(spec.search, estimator, cls.__name__)


@dataclass(frozen=True)
class _LogInt:
    """Integers from `low` to `high`, both included, drawn log-uniformly (scipy has no such
    distribution; ``RandomizedSearchCV`` needs only ``rvs``)."""

    low: int
    high: int

    def rvs(self, random_state: Any = None) -> int:
        from scipy.stats import loguniform

        drawn = loguniform(self.low, self.high + 1).rvs(random_state=random_state)
        return min(int(np.floor(drawn)), self.high)


def _distribution(d: Distribution) -> Any:
    """What ``RandomizedSearchCV`` draws `d` from; an int range includes `high`, as in
    ``corral tune``'s spaces."""
    from scipy.stats import loguniform, randint, uniform

    if d.type == "int":
        low, high = int(d.low), int(d.high)
        return _LogInt(low, high) if d.log else randint(low, high + 1)
    return loguniform(d.low, d.high) if d.log else uniform(d.low, d.high - d.low)


def _with_jobs(estimator: Any, n_jobs: int | None) -> Any:
    """`estimator`, its own joblib parallelism (a forest's trees) set to `n_jobs` where it
    has any. A fit on the driver takes the CPUs of all the job's workers; a candidate's
    fit in one worker, that worker's ``cpus``."""
    if "n_jobs" in estimator.get_params(deep=False):
        estimator.set_params(n_jobs=n_jobs)
    return estimator


def _search(estimator: Any, search: SklearnSearch, n_jobs: int) -> Any:
    """The search `search` describes, without its refit (`fit` refits on the driver).

    A candidate's failure raises (``error_score="raise"``) rather than scoring NaN with a
    warning: `check` has passed every value, so a failure here is a combination the
    estimator refuses, which the user should see now, not in a log after the search.
    """
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV

    common: dict[str, Any] = {
        "scoring": search.scoring,
        "cv": search.cv,
        "n_jobs": n_jobs,
        "refit": False,
        "error_score": "raise",
    }
    if search.kind == "grid":
        return GridSearchCV(estimator, search.space, **common)
    space = {
        name: _distribution(values) if isinstance(values, Distribution) else values
        for name, values in search.space.items()
    }
    return RandomizedSearchCV(
        estimator, space, n_iter=search.n_iter, random_state=search.seed, **common
    )


def _reach(spark: Any, cls: type) -> None:
    """Make sure Spark's Python workers can load `cls`, refusing in one line if not.

    A class from a user's ``file.py`` is sent by value, as corral's cloudpickle sends it,
    by pyspark's own copy too. One task then loads it, since a class the workers cannot
    import (a module only beside the job, a package missing there) would otherwise fail
    every fit, and joblib-spark (0.6, with joblib 1.6) loses the task's error on the way
    back, leaving only an unrelated ``TypeError``.

    Raises:
        LaunchError: if a Spark worker cannot load the class.
    """
    import pickle

    import cloudpickle
    from pyspark import cloudpickle as spark_cloudpickle

    module = sys.modules[cls.__module__]
    if module.__name__ in cloudpickle.list_registry_pickle_by_value():
        spark_cloudpickle.register_pickle_by_value(module)
    payload = spark_cloudpickle.dumps(cls)

    def load(_: Any) -> str:
        try:
            pickle.loads(payload)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    problem = spark.sparkContext.parallelize([0], 1).map(load).collect()[0]
    if problem:
        raise LaunchError(f"estimator: Spark's workers cannot load {cls.__name__}: {problem}")


@contextmanager
def _workers(spec: SklearnSpec, cls: type) -> Iterator[None]:
    """Run the joblib tasks started inside on the job's workers.

    On Spark, fewer task slots than workers is only warned about: joblib-spark's tasks are
    ordinary ones, which Spark queues until a slot frees (unlike the barrier stages the
    Spark engine refuses to start short), and a cluster that is still adding executors
    reports fewer slots than it will have.
    """
    import joblib

    workers = spec.roles.worker
    if spec.engine == "local":
        with joblib.parallel_config(
            backend="loky", n_jobs=workers.count, inner_max_num_threads=workers.cpus
        ):
            yield
        return
    from joblibspark import register_spark

    from corral.engines.spark import session, task_slots

    spark = session(spec.spark.master, spec.spark.conf)
    slots = task_slots(spark.sparkContext)
    if slots < workers.count:
        log.warning(
            "the Spark cluster runs %d task(s) at once, fewer than the job's %d workers: "
            "the search's fits will queue",
            slots,
            workers.count,
        )
    _reach(spark, cls)
    register_spark()
    with joblib.parallel_config(backend="spark", n_jobs=workers.count):
        yield


def _validation_arrays(
    data: DataSpec, base: Path, features: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The validation set, in the training set's columns."""
    if data.features is None:
        data = data.model_copy(update={"features": features})
    x, y, columns = read_arrays(data, base)
    if columns != features:
        raise DataError(f"validation.features {columns} are not the training features {features}")
    return x, y


def fit(spec: SklearnSpec, *, base: Path, report: Report) -> tuple[ClassicModel, dict[str, float]]:
    """Fit `spec`'s estimator (the best of its search) on its data; report the one row.

    Raises:
        DataError: in one line, where scikit-learn refuses the data (a continuous label
            for a classifier).
    """
    from sklearn.base import clone, is_classifier
    from sklearn.metrics import get_scorer
    from sklearn.utils.multiclass import check_classification_targets

    cls = _estimator_class(spec, base)
    workers = spec.roles.worker
    x, y, features = read_arrays(spec.data, base)
    estimator = cls(**_params(spec, cls))
    classifier = bool(is_classifier(estimator))
    metrics: dict[str, float] = {}
    try:
        if classifier:  # here, before any task: joblib-spark loses a task's error
            check_classification_targets(y)
        if spec.search is not None:
            one_worker = _with_jobs(clone(estimator), workers.cpus)
            search = _search(one_worker, spec.search, workers.count)
            with _workers(spec, cls):
                search.fit(x, y)
            estimator = clone(estimator).set_params(**search.best_params_)
            metrics["cv_score"] = float(search.best_score_)
        _with_jobs(estimator, workers.count * workers.cpus).fit(x, y)
    except ValueError as exc:
        raise DataError(f"{cls.__name__}.fit: {_first_line(exc)}") from None
    scoring = (spec.search.scoring if spec.search else None) or ("accuracy" if classifier else "r2")
    if spec.validation is not None:
        vx, vy = _validation_arrays(spec.validation, base, features)
        metrics[f"val_{scoring}"] = float(get_scorer(scoring)(estimator, vx, vy))
    else:
        metrics[f"train_{scoring}"] = float(get_scorer(scoring)(estimator, x, y))
    report(epoch_row(1, spec.epochs, metrics))
    _with_jobs(estimator, None)  # where it predicts (a Spark UDF per core), one thread
    model = ClassicModel(
        estimator=estimator, features=features, classifier=classifier, kind="sklearn"
    )
    return model, metrics
