"""`corral.tune` and ``corral tune``: a search run here, by a private job service, or on
a server.

Locally, the search runs exactly as on a server, without the HTTP: a store in a folder
of its own (SQLite), a runner that starts each trial as a job process under the
machine's pool, and the search driver (`corral.service.searches`). So a trial is a job
like any other (its own processes, checkpoints, restarts), and the same command run
again after a crash (``kill -9`` of this process, say) opens the same folder and finds
the search where its journal left it: the trials still running are re-attached (they
run in sessions of their own) or restarted from their checkpoints, the finished ones
are not run again.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from corral.errors import CorralError, SpecError
from corral.runtime.resources import Resources
from corral.search.driver import SearchRequest
from corral.search.space import Space
from corral.service.models import SearchDetail
from corral.spec import AnyJobSpec, load_spec, parse, parse_job

if TYPE_CHECKING:
    from corral.train.trainer import Trainer


class SearchFailed(CorralError):
    """A search that ended without succeeding; `detail` holds its trials as they ended."""

    def __init__(self, detail: SearchDetail) -> None:
        self.detail = detail
        super().__init__(f"the search {detail.state}: {detail.reason}")


#: The team and user a local search's trials run as, in its private store.
LOCAL = "local"
#: Seconds between two looks at a search being followed.
FOLLOW_POLL_S = 1.0


def search_request(
    job: AnyJobSpec | Mapping[str, Any] | str | Path,
    space: Space | Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The body of a search: the job with its paths made absolute (a trial runs in a
    folder of its own), the space and the settings, validated (`SearchRequest`).

    `job` is a YAML file (its paths relative to its folder), a `JobSpec` or a mapping
    (paths relative to the current folder).

    Raises:
        SpecError: naming what is wrong, before any trial runs.
    """
    from corral.service.client import portable_spec

    if isinstance(job, (str, Path)):
        spec, base = load_spec(job), Path(job).resolve().parent
    else:
        spec = job if isinstance(job, AnyJobSpec) else parse_job(dict(job), source="job")
        base = Path.cwd()
    portable = portable_spec(spec, base)
    if spec.tracking is not None and spec.tracking.uri is None:
        # every trial runs in a folder of its own: MLflow's default store is where this
        # command runs (or MLFLOW_TRACKING_URI), written out for all of them and the search
        from mlflow import get_tracking_uri

        portable["tracking"] = {**portable.get("tracking", {}), "uri": get_tracking_uri()}
    body = {
        "spec": portable,
        "space": Space.of(space).model_dump(mode="json"),
        "settings": dict(settings),
    }
    return parse(SearchRequest, body, source="search").model_dump(mode="json")


@contextlib.contextmanager
def local_service(folder: Path, pool: Resources | None = None) -> Iterator[Any]:
    """A private job service in `folder`: yields its `Searches`, with a runner started
    beside it; both stop on the way out (trials still running are stopped, and restart
    from their checkpoints when the search is opened again)."""
    from corral.service.cluster import machine_pool
    from corral.service.isolation import Isolation
    from corral.service.runner import ProcessStarter, Runner
    from corral.service.searches import Searches
    from corral.service.store import Store

    folder.mkdir(parents=True, exist_ok=True)
    pool = pool or machine_pool()
    store = Store(f"sqlite:///{folder / 'tune.db'}")
    if LOCAL not in store.teams():
        store.create_team(LOCAL)
    if not any(u.name == LOCAL for u in store.users()):
        store.create_user(LOCAL, LOCAL)
    runner = Runner(
        store,
        pool=pool,
        state_dir=folder,
        interval=0.2,
        start_attempt=ProcessStarter(Isolation(accounts=False)),
    )
    searches = Searches(
        store, pool=pool, interval=0.2, job_folder=runner.folder, kept=folder / "searches"
    )
    runner.start()
    searches.start()
    try:
        yield searches
    finally:
        searches.stop()
        runner.stop(stop_jobs=True)
        store.close()


def run_local(
    request: dict[str, Any],
    *,
    folder: Path,
    pool: Resources | None = None,
    on_update: Callable[[SearchDetail], None] | None = None,
) -> SearchDetail:
    """Run (or continue) a search in a private service in `folder` until it ends."""
    from corral.service import submission
    from corral.service.searches import search_detail

    with local_service(folder, pool) as searches:
        user = next(u for u in searches.store.users() if u.name == LOCAL)
        search = parse(SearchRequest, request, source="search")
        submission.admit(searches.store, searches.pool, user, search.spec)
        made, _ = searches.searches.create(user, search)
        return follow(
            lambda: search_detail(searches.searches, searches.searches.get(made.id) or made),
            on_update,
        )


def follow(
    look: Callable[[], SearchDetail], on_update: Callable[[SearchDetail], None] | None
) -> SearchDetail:
    """Look at a search every `FOLLOW_POLL_S` until it has ended; each look to `on_update`."""
    while True:
        detail = look()
        if on_update is not None:
            on_update(detail)
        if detail.state != "running":
            return detail
        time.sleep(FOLLOW_POLL_S)


def search_settings(
    *, pruner: Any = None, pbt: Mapping[str, Any] | None = None, **given: Any
) -> dict[str, Any]:
    """The settings of a search as `SearchSettings` reads them: a pruner only where one
    was chosen (PBT refuses one), PBT's only where asked for."""
    settings = dict(given)
    if pruner is not None:
        settings["pruner"] = pruner
    if pbt is not None:
        settings["pbt"] = dict(pbt)
    return settings


def tune(
    job: Trainer | AnyJobSpec | Mapping[str, Any] | str | Path,
    space: Space | Mapping[str, Any],
    *,
    data: Any = None,
    features: list[str] | None = None,
    label: str | None = None,
    validation: Any = None,
    metric: str = "val_accuracy",
    mode: str = "max",
    trials: int = 16,
    concurrency: int = 2,
    sampler: str = "tpe",
    pruner: str | Mapping[str, Any] | None = None,
    pbt: Mapping[str, Any] | None = None,
    name: str = "search",
    max_failures: int = 3,
    seed: int = 0,
    folder: str | Path = "corral-tune",
    pool: Resources | None = None,
    on_update: Callable[[SearchDetail], None] | None = None,
) -> SearchDetail:
    """Search the hyperparameters of a job: every trial a job of a private service in
    `folder`, on this machine's processes. Calling it again with the same arguments
    continues the same search (or returns it, if it has ended).

    Args:
        job: A YAML job file, a `JobSpec` or a mapping of one, or a `Trainer` (with
            `data`; its parts are pickled into `folder` for the trials' jobs, see
            `corral.jobs.job_of_trainer`; give it a `corral.OptimizerSpec` to search
            ``optimizer.lr``).
        data, features, label, validation: What a `Trainer` fits on, as for its
            ``fit``: ``(X, y)`` arrays, a pandas DataFrame or a Parquet path.
        space: Spec paths to ranges or choices (`corral.search.space`).
        metric: An epoch metric the job reports (``val_*`` needs validation data).
        mode: ``max`` or ``min``.
        trials: Trials in all; concurrency: trials at once (also bounded by the pool).
        sampler: ``tpe``, ``random``, ``grid`` or ``cmaes``.
        pruner: ``asha`` (the default without `pbt`), ``hyperband``, ``median``,
            ``none``, or a mapping of its settings.
        pbt: Population based training instead (`corral.search.driver.Pbt`'s
            settings, ``{}`` for its defaults).
        name: The search's name in `folder`.

    Returns:
        The search: its trials, the best one and its spec (``best_spec``).

    Raises:
        SpecError: a search that cannot run, before any trial.
        SearchFailed: a search that failed (its trials failed, say), with the reason and
            its trials.

    Example:
        >>> found = corral.tune("job.yaml", {"optimizer.lr": {"low": 1e-3, "high": 0.3,
        ...     "log": True}}, trials=8)
        >>> found.best.params
    """
    settings = search_settings(
        name=name,
        metric=metric,
        mode=mode,
        trials=trials,
        concurrency=concurrency,
        sampler=sampler,
        pruner=pruner,
        pbt=pbt,
        max_failures=max_failures,
        seed=seed,
    )
    if not isinstance(job, AnyJobSpec | Mapping | str | Path):
        from corral.jobs import job_of_trainer

        if data is None:
            raise SpecError("data: a search of a Trainer needs the data it fits on")
        job = job_of_trainer(
            job,
            data,
            folder=Path(folder, "trainers", name),
            features=features,
            label=label,
            validation=validation,
        )
    request = search_request(job, space, settings)
    detail = run_local(request, folder=Path(folder).resolve(), pool=pool, on_update=on_update)
    if detail.state != "succeeded":
        raise SearchFailed(detail)
    return detail


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "nan"
    return f"{value:.4g}"


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _headers(paths: list[str]) -> list[str]:
    """Each parameter's last path segment (``lr`` for ``optimizer.lr``), or more where
    two would read the same, to keep the table narrow."""
    short = [p.rsplit(".", 1)[-1] for p in paths]
    return [s if short.count(s) == 1 else p for s, p in zip(short, paths, strict=True)]


def summary(detail: SearchDetail) -> str:
    """One line: the search, its state, how many trials of how many, and why."""
    return (
        f"search {detail.name} ({detail.id}): {detail.state}, "
        f"{len(detail.trial_list)} of {detail.trials} trials; {detail.reason}"
    )


def trial_table(detail: SearchDetail) -> Table:
    """The search's trials as a table: state, params, the metric, epochs run, and why a
    trial failed."""
    best = detail.best.number if detail.best else None
    table = Table(box=None, header_style="bold")
    params = list(detail.request["space"])
    for column in ("TRIAL", "STATE", *_headers(params), detail.metric, "EPOCHS"):
        table.add_column(column, no_wrap=True)
    table.add_column("WHY")
    for trial in detail.trial_list:
        table.add_row(
            f"{trial.number}{' *' if trial.number == best else ''}",
            trial.state,
            *(_param(trial.params[p]) if p in trial.params else "-" for p in params),
            _number(trial.value),
            str(trial.epochs),
            trial.reason if trial.state == "fail" else "",
        )
    return table
