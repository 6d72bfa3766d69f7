"""Hyperparameter searches as the service runs them: rows of `searches`, each with its
Optuna study kept as a journal in `search_journal`, and a driver thread that runs their
trials as jobs of the searching user, in the same queue as every other job.

So a trial is admitted under its team's quota and fair-shared with the other teams'
jobs; a search with more ``concurrency`` than the quota allows has trials waiting in
the queue, not failing. The study lives in the service's own database, SQLite or
PostgreSQL, through Optuna's journal storage: an append-only log of the study's
operations, one writer per search (this driver), so none of the lock trouble of
Optuna's RDB storage on SQLite under parallel trials. A server killed at any instant
finds, on its next start, every search where the journal left it (`corral.search.driver`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from corral.errors import CorralError, SpecError
from corral.runtime import checkpoint as ckpt
from corral.runtime.resources import Resources
from corral.search.driver import (
    JOB_ATTR,
    REASON_ATTR,
    Driver,
    SearchRequest,
    TrialHost,
    TrialStatus,
    best_trial,
    make_study,
    trial_spec,
)
from corral.search.pbt import make_driver
from corral.service import schema as t
from corral.service import submission
from corral.service.job import CHECKPOINTS
from corral.service.models import SearchDetail, SearchOut, TrialOut
from corral.service.search_tracking import ParentRun, TrackedTrials, tracking_of
from corral.service.store import Store, User

log = logging.getLogger("corral.service")

SearchState = Literal["running", "succeeded", "failed", "cancelled"]
FINAL = ("succeeded", "failed", "cancelled")

_STATE_OF_JOB: dict[str, Literal["waiting", "running", "succeeded", "failed", "stopped"]] = {
    "queued": "waiting",
    "restarting": "waiting",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "stopped",
}


class SearchExists(CorralError):
    """The user has a search of that name with another request."""


@dataclass(frozen=True)
class Search:
    """One row of `searches`."""

    id: str
    name: str
    user: str
    team: str
    state: str
    request: SearchRequest
    created: float
    ended: float | None
    reason: str
    cancel_requested: bool

    @property
    def final(self) -> bool:
        return self.state in FINAL


def _search(row: Any) -> Search:
    return Search(
        id=row.id,
        name=row.name,
        user=row.user,
        team=row.team,
        state=row.state,
        request=SearchRequest.model_validate(row.request),
        created=row.created,
        ended=row.ended,
        reason=row.reason,
        cancel_requested=row.cancel_requested,
    )


class SearchStore:
    """The searches of a `Store`'s database."""

    def __init__(self, store: Store) -> None:
        self.store, self.engine = store, store.engine

    def create(self, user: User, request: SearchRequest) -> tuple[Search, bool]:
        """Store a new search; or, for a user's search of the same name and request, that
        one (the same ``corral tune`` command again attaches to it) and ``False``.

        Raises:
            SearchExists: that name holds another request.
        """
        body = request.model_dump(mode="json")
        row = {
            "id": secrets.token_hex(6),
            "name": request.settings.name,
            "user": user.name,
            "team": user.team,
            "state": "running",
            "request": body,
            "created": time.time(),
            "reason": "searching",
            "cancel_requested": False,
        }
        try:
            with self.engine.begin() as db:
                db.execute(insert(t.searches), row)
        except IntegrityError:
            found = self.by_name(user.name, request.settings.name)
            if found is None:
                raise
            if found.request.model_dump(mode="json") != body:
                raise SearchExists(
                    f"a search named '{found.name}' with another job, space or settings "
                    "exists: give this one another name (settings.name, or --name)"
                ) from None
            return found, False
        made = self.get(str(row["id"]))
        assert made is not None
        return made, True

    def get(self, search_id: str) -> Search | None:
        with self.engine.connect() as db:
            row = db.execute(select(t.searches).where(t.searches.c.id == search_id)).first()
        return _search(row) if row else None

    def by_name(self, user: str, name: str) -> Search | None:
        query = select(t.searches).where(t.searches.c.user == user, t.searches.c.name == name)
        with self.engine.connect() as db:
            row = db.execute(query).first()
        return _search(row) if row else None

    def list(self, *, team: str | None = None, states: Iterable[str] | None = None) -> list[Search]:
        query = select(t.searches).order_by(t.searches.c.created.desc())
        if team is not None:
            query = query.where(t.searches.c.team == team)
        if states is not None:
            query = query.where(t.searches.c.state.in_(list(states)))
        with self.engine.connect() as db:
            return [_search(r) for r in db.execute(query).all()]

    def end(self, search_id: str, state: SearchState, reason: str) -> None:
        query = update(t.searches).where(t.searches.c.id == search_id)
        with self.engine.begin() as db:
            db.execute(query.values(state=state, reason=reason, ended=time.time()))

    def request_cancel(self, search_id: str) -> None:
        query = update(t.searches).where(t.searches.c.id == search_id)
        with self.engine.begin() as db:
            db.execute(query.values(cancel_requested=True))

    def study(self, search: Search) -> Any:
        """The search's Optuna study, on its journal in this database."""
        storage = JournalStorage(Journal(self.engine, search.id))
        return make_study(search.request.settings, search.request.space, storage)


class Journal(BaseJournalBackend):
    """Optuna's journal of one search's study, as rows of `search_journal`.

    Optuna asks a backend to be safe for several processes: an append takes the next
    numbers in one transaction, and the primary key refuses a number taken twice, so a
    second writer racing the first fails and retries rather than interleaving."""

    def __init__(self, engine: Any, search_id: str) -> None:
        self.engine, self.search = engine, search_id

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        j = t.search_journal
        query = (
            select(j.c.data)
            .where(j.c.search == self.search, j.c.seq >= log_number_from)
            .order_by(j.c.seq)
        )
        with self.engine.connect() as db:
            return [r.data for r in db.execute(query)]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        j = t.search_journal
        for attempt in range(5):
            try:
                with self.engine.begin() as db:
                    last = db.scalar(select(func.max(j.c.seq)).where(j.c.search == self.search))
                    first = -1 if last is None else int(last)
                    rows = [
                        {"search": self.search, "seq": first + 1 + i, "data": entry}
                        for i, entry in enumerate(logs)
                    ]
                    db.execute(insert(j), rows)
                return
            except IntegrityError:
                if attempt == 4:
                    raise


class StoreTrials:
    """A search's trials as jobs of its user in the store's queue. A checkpoint another
    trial starts from (PBT) is copied into `kept`, beside the job folders, owned as the
    job's own folder is (the team's account, where jobs run as one)."""

    def __init__(
        self,
        store: Store,
        pool: Resources,
        user: User,
        search: Search,
        *,
        job_folder: Callable[[str], Path] | None = None,
        kept: Path | None = None,
    ) -> None:
        self.store, self.pool, self.user, self.search = store, pool, user, search
        self.job_folder, self.kept = job_folder, kept

    def submit(self, number: int, spec: dict[str, Any]) -> str:
        key = f"search-{self.search.id}-{number}"
        made = self.store.job_by_key(self.user.name, key)
        if made is None:
            made = submission.queue(self.store, self.pool, self.user, spec, client_key=key)
        return made.id

    def status(self, job: str) -> TrialStatus:
        found = self.store.job(job)
        if found is None:
            return TrialStatus("failed", reason=f"its job {job} is gone")
        epochs = [m for m in self.store.metrics(job) if m.get("kind") == "epoch"]
        return TrialStatus(_STATE_OF_JOB.get(found.state, "waiting"), epochs, found.reason)

    def stop(self, job: str, reason: str) -> None:
        found = self.store.job(job)
        if found is not None:
            submission.cancel(self.store, found, reason)

    def checkpoint(self, job: str) -> str | None:
        if self.job_folder is None or self.kept is None:
            return None
        source = self.job_folder(job) / CHECKPOINTS
        for _ in range(3):  # the job's retention may delete its newest as a newer comes
            newest = ckpt.latest(source)
            if newest is None:
                return None
            folder = self.kept / self.search.id
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = folder / f"{job}-{newest.name}"
            partial = target.with_name(f".{target.name}.partial")
            try:
                shutil.copyfile(newest, partial)
            except FileNotFoundError:
                continue
            owner = source.stat()
            with contextlib.suppress(PermissionError):  # a one-user server: its own
                os.chown(folder, owner.st_uid, owner.st_gid)
                os.chown(partial, owner.st_uid, owner.st_gid)
            os.replace(partial, target)
            return str(target)
        return None


class Searches:
    """Drives every running search of the store, one pass every `interval` seconds, in
    a thread of the server (or of a local ``corral tune``)."""

    def __init__(
        self,
        store: Store,
        *,
        pool: Resources,
        interval: float = 0.5,
        mlflow_uri: str | None = None,
        job_folder: Callable[[str], Path] | None = None,
        kept: Path | None = None,
    ) -> None:
        self.store, self.pool, self.interval = store, pool, interval
        #: Where the runner keeps a job's files, and where checkpoints a trial starts
        #: from are kept (PBT); without them, PBT never exploits.
        self.job_folder, self.kept = job_folder, kept
        #: Every search is tracked on this MLflow store, in its team's experiment (else
        #: where its job's own ``tracking`` says, if it says).
        self.mlflow_uri = mlflow_uri
        self.searches = SearchStore(store)
        self._drivers: dict[str, Driver] = {}
        self._parents: dict[str, ParentRun] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Passes completed: what a caller waits on to know a change was seen.
        self.passes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="corral-searches", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:
                log.exception("search pass failed; retrying")

    def tick(self) -> None:
        for search in self.searches.list(states=["running"]):
            try:
                self._advance(search)
            except SpecError as exc:  # a trial the queue refuses: the search cannot go on
                self._finish(search, "failed", str(exc))
            except Exception:  # MLflow or the database away, say: retried next pass
                log.exception("search %s: pass failed; retrying", search.id)
                self._drivers.pop(search.id, None)
        self.passes += 1

    def driver(self, search: Search) -> Driver:
        driver = self._drivers.get(search.id)
        if driver is None:
            user = next((u for u in self.store.users() if u.name == search.user), None)
            if user is None:
                raise CorralError(f"search {search.id}: no user '{search.user}'")
            request = search.request
            study = self.searches.study(search)
            host: TrialHost = StoreTrials(
                self.store,
                self.pool,
                user,
                search,
                job_folder=self.job_folder,
                kept=self.kept,
            )
            tracking = tracking_of(request.spec, uri=self.mlflow_uri, team=search.team)
            if tracking is not None:
                parent = ParentRun(
                    tracking,
                    study,
                    name=search.name,
                    search_id=search.id,
                    metric=request.settings.metric,
                )
                parent.start(
                    request.settings.model_dump(mode="json"),
                    request.space.model_dump(mode="json", exclude_defaults=True),
                )
                self._parents[search.id] = parent
                host = TrackedTrials(host, parent, request.settings.name)
            driver = make_driver(
                study,
                spec=request.spec,
                space=request.space,
                settings=request.settings,
                host=host,
            )
            self._drivers[search.id] = driver
        return driver

    def _advance(self, search: Search) -> None:
        driver = self.driver(search)
        if search.cancel_requested:
            driver.stop_all("the search was cancelled")
            self._finish(search, "cancelled", "cancelled on request")
            return
        outcome = driver.step()
        parent = self._parents.get(search.id)
        if parent is not None:
            parent.record()
        if outcome is not None:
            self._finish(search, outcome.state, outcome.reason)

    def _finish(self, search: Search, state: SearchState, reason: str) -> None:
        if state != "succeeded":
            with contextlib.suppress(CorralError):
                self.driver(search).stop_all(f"the search ended: {reason}")
        self.searches.end(search.id, state, reason)
        self._drivers.pop(search.id, None)
        parent = self._parents.pop(search.id, None)
        if parent is not None:
            try:
                parent.end(state)
            except Exception:  # the search's state is what matters; its run is a record
                log.exception("search %s: its MLflow run could not be ended", search.id)
        log.info("search %s %s: %s", search.id, state, reason)


def trials_of(study: Any, store: Store) -> list[TrialOut]:
    """Every trial of the study, in order, with its reports of the metric; a running
    trial whose job waits in the queue is ``queued``."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name.lower()
        job = trial.system_attrs.get(JOB_ATTR)
        if state == "running" and job is not None:
            found = store.job(job)
            if found is not None and found.state in ("queued", "restarting"):
                state = found.state
        reported = trial.intermediate_values
        history = [reported[epoch] for epoch in sorted(reported)]
        value = trial.value if trial.value is not None else (history[-1] if history else None)
        rows.append(
            TrialOut(
                number=trial.number,
                state=state,
                params=dict(trial.params),
                value=value,
                epochs=len(history),
                history=history,
                job=job,
                reason=trial.user_attrs.get(REASON_ATTR, ""),
            )
        )
    return rows


def search_out(search: Search) -> SearchOut:
    settings = search.request.settings
    return SearchOut(
        id=search.id,
        name=search.name,
        user=search.user,
        team=search.team,
        state=search.state,
        reason=search.reason,
        created=search.created,
        ended=search.ended,
        metric=settings.metric,
        mode=settings.mode,
        trials=settings.trials,
    )


#: Parameter importances by (search, trials completed): fANOVA takes a fraction of a
#: second, and the live table asks every second.
_importances: dict[tuple[str, int], dict[str, float]] = {}


def _importance(search: Search, study: Any, trials: list[TrialOut]) -> dict[str, float]:
    done = sum(t.state == "complete" for t in trials)
    key = (search.id, done)
    if key not in _importances:
        found: dict[str, float] = {}
        if done >= 3 and len(search.request.space.root) > 1:
            import optuna

            try:
                found = dict(optuna.importance.get_param_importances(study))
            except (RuntimeError, ValueError):  # too few distinct values yet
                found = {}
        if len(_importances) > 1000:
            _importances.clear()
        _importances[key] = found
    return _importances[key]


def search_detail(searches: SearchStore, search: Search) -> SearchDetail:
    """What GET /api/searches/{id}, its page and the CLI's live table show."""
    study = searches.study(search)
    trials = trials_of(study, searches.store)
    found = best_trial(study)
    best = None if found is None else trials[found.number]
    return SearchDetail(
        **search_out(search).model_dump(),
        request=search.request.model_dump(mode="json"),
        trial_list=trials,
        best=best,
        best_spec=best_spec(search, study),
        importance=_importance(search, study, trials),
    )


def best_spec(search: Search, study: Any) -> dict[str, Any] | None:
    """The best trial's job, named after the search: ready for ``corral train``."""
    best = best_trial(study)
    if best is None:
        return None
    request = search.request
    spec = trial_spec(request.spec, request.settings, best.number, best.params)
    return {**spec, "name": f"{request.settings.name}-best"}
