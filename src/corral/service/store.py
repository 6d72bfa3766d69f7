"""The service's state: teams, users, quotas and jobs, in SQLite (a file, the embedded
default) or PostgreSQL (by URL), behind one small API that the routes, the runner and
the UI share.

Opening a store brings its schema to the newest Alembic revision. A job's state changes
only through `transition`, which checks the state it expects in the same statement
(compare-and-set), so the runner, a cancel request and a restarted server cannot both
win, and records each change as an event with its time, its reason and how many of the
job's restarts it spent (`restarts_spent` sums them). The runner copies a job's log and
metrics lines with `copy_output`, which moves the job's file offsets in the same
transaction: a kill at any instant leaves the lines and the offsets agreeing.

Example:
    >>> store = Store("sqlite:///corral.db")
    >>> store.create_team("vision")
    >>> user, token = store.create_user("ada", "vision")
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from corral.errors import CorralError
from corral.runtime.resources import Resources
from corral.service import schema as t
from corral.service.resources import Quota

#: Every state a job can be in; the last three are final.
STATES = ("queued", "running", "restarting", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
#: How a token starts: greppable in leaked text, never a valid id or name.
TOKEN_PREFIX = "crl_"


class StoreError(CorralError):
    """A request the state does not allow: a duplicate name, an unknown team, …"""


@dataclass(frozen=True)
class User:
    name: str
    team: str
    admin: bool


@dataclass(frozen=True)
class Job:
    """One row of `jobs`, as the routes and the runner see it."""

    id: str
    name: str
    user: str
    team: str
    state: str
    priority: int
    spec: dict[str, Any]
    demand: Resources
    attempts: int
    max_restarts: int
    submitted: float
    started: float | None
    ended: float | None
    reason: str
    pid: int | None
    cancel_requested: bool
    preemptible: bool = False
    expected_runtime: float | None = None
    #: Bytes of the job's log and metrics files already copied into the store.
    log_offset: int = 0
    metrics_offset: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True)
class Event:
    at: float
    state: str
    reason: str
    #: How many of the job's max_restarts this change spent.
    restarts: int = 0


@dataclass
class Page:
    """Log lines after a cursor, and the cursor to ask from next time."""

    lines: list[str] = field(default_factory=list)
    next: int = 0


#: The submit path's statements, built once: SQLAlchemy then reuses their compiled form
#: and cache key, where a statement built per call (``insert().values(**row)``) costs
#: more CPU than the round trip it makes.
_INSERT_JOB = insert(t.jobs)
_INSERT_JOB_RETURNING = insert(t.jobs).returning(*t.jobs.c)
_INSERT_SUBMITTED = insert(t.events).values(state="queued", reason="submitted")
_JOB_COLUMNS = [c.name for c in t.jobs.c if c.name not in ("started", "ended", "pid")]


def _submit_statement() -> Any:
    """PostgreSQL's submit in one statement: the job, its 'submitted' event (written from
    the row the job's insert returns), and the stored row back. One statement is atomic, so
    it runs alone, without BEGIN and COMMIT: one round trip where the transaction took four.
    A taken `client_key` fails all of it, as it failed the transaction."""
    values = {name: bindparam(name, type_=t.jobs.c[name].type) for name in _JOB_COLUMNS}
    job = insert(t.jobs).values(values).returning(*t.jobs.c).cte("submitted_job")
    event_row = select(job.c.id, job.c.submitted, job.c.state, job.c.reason, literal(0))
    submitted = insert(t.events).from_select(
        ["job", "at", "state", "reason", "restarts"], event_row, include_defaults=False
    )
    return select(job).add_cte(submitted.cte("submitted_event"))


_SUBMIT_PG = _submit_statement()
_USER_BY_HASH = select(t.users).where(t.users.c.token_hash == bindparam("token_hash"))
_JOB_BY_ID = select(t.jobs).where(t.jobs.c.id == bindparam("id"))
_JOB_BY_KEY = select(t.jobs).where(
    t.jobs.c.user == bindparam("user"), t.jobs.c.client_key == bindparam("client_key")
)
_QUOTA_OF = select(t.quotas).where(t.quotas.c.team == bindparam("team"))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers (the UI, `logs -f`) go on while the runner writes; the busy
    timeout makes concurrent writers queue instead of failing at once."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


#: How long a token found stays known without a read, and how many are. A user is never
#: changed or removed once made (nothing here or in the API does), so what a token names
#: cannot go stale; the expiry bounds what a hand-edited database could leave. Whatever
#: comes to revoke tokens must forget them here (`Store._users`).
USER_REMEMBERED_S = 60.0
USERS_REMEMBERED = 10_000

#: Connections a PostgreSQL store keeps open: as many as threads may use it at once (the
#: server's request threads, Starlette's 40, and its runner), and a few more for bursts. With
#: SQLAlchemy's default of 5, every request beyond the fifth at once opened a connection
#: (PostgreSQL forks a process for each) and closed it after: under 20 concurrent clients,
#: about two per request, most of the server's time (docs/benchmarks.md).
PG_POOL_SIZE = 40
PG_MAX_OVERFLOW = 10


def _engine(url: str, **options: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):  # psycopg 3, not the psycopg2 SQLAlchemy assumes
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if "poolclass" not in options:
        options = {"pool_size": PG_POOL_SIZE, "max_overflow": PG_MAX_OVERFLOW, **options}
    return create_engine(url, pool_pre_ping=True, **options)


def _upgrade(engine: Engine) -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Store:
    """The service's database. Thread-safe: every method runs in its own transaction."""

    def __init__(self, url: str, **engine_options: Any) -> None:
        self.url = url
        self.engine = _engine(url, **engine_options)
        #: Where statements that stand alone go: every read here, and the submit's insert on
        #: PostgreSQL. There they run outside a transaction (autocommit): one statement is
        #: atomic and sees one snapshot either way, and psycopg would otherwise spend a
        #: round trip on BEGIN and another on ROLLBACK (or COMMIT) around each.
        self._single = (
            self.engine
            if self.engine.dialect.name == "sqlite"
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        #: Users by their token's hash, with when to read them again (`user_by_token`).
        self._users: dict[str, tuple[User, float]] = {}
        _upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- teams, users, quotas -------------------------------------------------------

    def create_team(self, name: str) -> None:
        try:
            with self.engine.begin() as db:
                db.execute(insert(t.teams).values(name=name, created=time.time()))
        except IntegrityError:
            raise StoreError(f"team '{name}' already exists") from None

    def teams(self) -> list[str]:
        with self._single.connect() as db:
            return list(db.scalars(select(t.teams.c.name).order_by(t.teams.c.name)))

    def create_user(self, name: str, team: str, *, admin: bool = False) -> tuple[User, str]:
        """Add a user; returns it and its token, which is stored only hashed: show it once."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        if team not in self.teams():
            raise StoreError(f"no team '{team}'; create it first")
        try:
            with self.engine.begin() as db:
                db.execute(
                    insert(t.users).values(
                        name=name,
                        team=team,
                        admin=admin,
                        token_hash=hash_token(token),
                        created=time.time(),
                    )
                )
        except IntegrityError:
            raise StoreError(f"user '{name}' already exists") from None
        return User(name, team, admin), token

    def user_by_token(self, token: str) -> User | None:
        digest = hash_token(token)
        user = self.known_user(token, digest)
        if user is not None:
            return user
        with self._single.connect() as db:
            row = db.execute(_USER_BY_HASH, {"token_hash": digest}).first()
        if row is None:  # unknown tokens are never remembered: a user made since is found
            return None
        user = User(row.name, row.team, bool(row.admin))
        if len(self._users) >= USERS_REMEMBERED:
            self._users.clear()
        self._users[digest] = (user, time.monotonic() + USER_REMEMBERED_S)
        return user

    def known_user(self, token: str, digest: str | None = None) -> User | None:
        """The user of `token` if `user_by_token` found it lately, without a read: what
        the API's authentication asks first, on the event loop (no thread, no database)."""
        known = self._users.get(digest or hash_token(token))
        if known is None or known[1] < time.monotonic():
            return None
        return known[0]

    def users(self) -> list[User]:
        with self._single.connect() as db:
            rows = db.execute(select(t.users).order_by(t.users.c.name)).all()
        return [User(r.name, r.team, bool(r.admin)) for r in rows]

    def set_quota(self, team: str, quota: Quota) -> None:
        if team not in self.teams():
            raise StoreError(f"no team '{team}'")
        values = {"cpus": quota.cpus, "memory_mib": quota.memory_mib, "gpus": quota.gpus}
        with self.engine.begin() as db:
            done = db.execute(update(t.quotas).where(t.quotas.c.team == team).values(**values))
            if not done.rowcount:
                db.execute(insert(t.quotas).values(team=team, **values))

    def quotas(self) -> dict[str, Quota]:
        with self._single.connect() as db:
            rows = db.execute(select(t.quotas)).all()
        return {r.team: Quota(cpus=r.cpus, memory_mib=r.memory_mib, gpus=r.gpus) for r in rows}

    def quota(self, team: str) -> Quota | None:
        """The team's quota, as `quotas()` has it; None for a team without one."""
        with self._single.connect() as db:
            r = db.execute(_QUOTA_OF, {"team": team}).first()
        return Quota(cpus=r.cpus, memory_mib=r.memory_mib, gpus=r.gpus) if r else None

    # -- jobs -------------------------------------------------------------------------

    def add_job(
        self,
        *,
        user: User,
        name: str,
        spec: dict[str, Any],
        demand: Resources,
        priority: int = 0,
        max_restarts: int = 0,
        client_key: str | None = None,
        preemptible: bool = False,
        expected_runtime: float | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; returns it and whether it is new. A `client_key` seen before from
        the same user returns the job that key made: a retried submission is stored once."""
        job_id = secrets.token_hex(6)
        now = time.time()
        row = {
            "id": job_id,
            "name": name,
            "user": user.name,
            "team": user.team,
            "state": "queued",
            "priority": priority,
            "spec": spec,
            "cpus": demand.cpus,
            "memory_mib": demand.memory_mib,
            "gpus": demand.gpus,
            "attempts": 0,
            "max_restarts": max_restarts,
            "submitted": now,
            "reason": "submitted",
            "cancel_requested": False,
            "client_key": client_key,
            "preemptible": preemptible,
            "expected_runtime": expected_runtime,
        }
        stored = None
        try:
            if self.engine.dialect.name == "postgresql":
                with self._single.connect() as db:
                    stored = db.execute(
                        _SUBMIT_PG, {**row, "log_offset": 0, "metrics_offset": 0}
                    ).one()
            else:
                with self.engine.begin() as db:
                    if db.dialect.insert_returning:  # the row as stored, without a second read
                        stored = db.execute(_INSERT_JOB_RETURNING, row).one()
                    else:  # SQLite before 3.35
                        db.execute(_INSERT_JOB, row)
                    db.execute(_INSERT_SUBMITTED, {"job": job_id, "at": now})
        except IntegrityError:
            existing = None if client_key is None else self.job_by_key(user.name, client_key)
            if existing is None:
                raise
            return existing, False
        job = _job(stored) if stored is not None else self.job(job_id)
        assert job is not None
        return job, True

    def job(self, job_id: str) -> Job | None:
        with self._single.connect() as db:
            row = db.execute(_JOB_BY_ID, {"id": job_id}).first()
        return _job(row) if row else None

    def jobs(
        self,
        *,
        team: str | None = None,
        states: Sequence[str] | None = None,
        user: str | None = None,
        limit: int | None = None,
        with_spec: bool = True,
    ) -> list[Job]:
        """Jobs, newest first, narrowed by team, states and user. Without `with_spec`,
        their specs are left unread (``{}``): a scheduling pass needs none of them."""
        columns = [c for c in t.jobs.c if with_spec or c.name != "spec"]
        query = select(*columns).order_by(t.jobs.c.submitted.desc(), t.jobs.c.id)
        if team is not None:
            query = query.where(t.jobs.c.team == team)
        if states is not None:
            query = query.where(t.jobs.c.state.in_(list(states)))
        if user is not None:
            query = query.where(t.jobs.c.user == user)
        if limit is not None:
            query = query.limit(limit)
        with self._single.connect() as db:
            return [_job(r, with_spec) for r in db.execute(query).all()]

    def count_jobs(self) -> int:
        with self._single.connect() as db:
            return int(db.scalar(select(func.count()).select_from(t.jobs)) or 0)

    def transition(
        self,
        job_id: str,
        expected: Iterable[str],
        state: str,
        reason: str,
        *,
        spent: int = 0,
        **fields: Any,
    ) -> bool:
        """Move a job from one of the `expected` states to `state`, with `fields` set, and
        record the event, which `spent` that many of the job's restarts; False (and no
        change) when it was in another state by then."""
        assert state in STATES
        now = time.time()
        values = {"state": state, "reason": reason, **fields}
        if state in FINAL:
            values.setdefault("ended", now)
        with self.engine.begin() as db:
            done = db.execute(
                update(t.jobs)
                .where(t.jobs.c.id == job_id, t.jobs.c.state.in_(list(expected)))
                .values(**values)
            )
            if not done.rowcount:
                return False
            db.execute(
                insert(t.events).values(
                    job=job_id, at=now, state=state, reason=reason, restarts=spent
                )
            )
        return True

    def set_fields(self, job_id: str, **fields: Any) -> None:
        with self.engine.begin() as db:
            db.execute(update(t.jobs).where(t.jobs.c.id == job_id).values(**fields))

    def request_cancel(self, job_id: str, reason: str = "cancelled on request") -> bool:
        """Ask the runner to stop a job, saying who asked (the job's reason until it
        stops); False if it had already ended."""
        with self.engine.begin() as db:
            done = db.execute(
                update(t.jobs)
                .where(t.jobs.c.id == job_id, t.jobs.c.state.not_in(FINAL))
                .values(cancel_requested=True, reason=reason)
            )
        return bool(done.rowcount)

    def job_by_key(self, user: str, client_key: str) -> Job | None:
        """The job `user` submitted with `client_key`, if any."""
        with self._single.connect() as db:
            row = db.execute(_JOB_BY_KEY, {"user": user, "client_key": client_key}).first()
        return _job(row) if row else None

    def events(self, job_id: str) -> list[Event]:
        with self._single.connect() as db:
            rows = db.execute(
                select(t.events).where(t.events.c.job == job_id).order_by(t.events.c.id)
            ).all()
        return [Event(r.at, r.state, r.reason, r.restarts) for r in rows]

    def restarts_spent(self, job_id: str) -> int:
        """How many of its max_restarts the job has spent, summed from its events."""
        with self._single.connect() as db:
            total = db.scalar(
                select(func.coalesce(func.sum(t.events.c.restarts), 0)).where(
                    t.events.c.job == job_id
                )
            )
        return int(total or 0)

    def copy_output(
        self,
        job_id: str,
        lines: Sequence[str],
        metrics: Sequence[dict[str, Any]],
        *,
        log_offset: int,
        metrics_offset: int,
    ) -> None:
        """Add lines copied from the job's files and move its offsets past them, in one
        transaction: a kill before the commit copies them again, one after never does."""
        now = time.time()
        with self.engine.begin() as db:
            if lines:
                db.execute(insert(t.logs), [{"job": job_id, "line": line} for line in lines])
            if metrics:
                rows = [{"job": job_id, "at": now, "data": m} for m in metrics]
                db.execute(insert(t.metrics), rows)
            db.execute(
                update(t.jobs)
                .where(t.jobs.c.id == job_id)
                .values(log_offset=log_offset, metrics_offset=metrics_offset)
            )

    def logs(self, job_id: str, after: int = 0, limit: int = 1000) -> Page:
        """Log lines after cursor `after` (0: from the start), at most `limit`."""
        with self._single.connect() as db:
            rows = db.execute(
                select(t.logs.c.id, t.logs.c.line)
                .where(t.logs.c.job == job_id, t.logs.c.id > after)
                .order_by(t.logs.c.id)
                .limit(limit)
            ).all()
        return Page([r.line for r in rows], rows[-1].id if rows else after)

    def tail(self, job_id: str, lines: int) -> list[str]:
        with self._single.connect() as db:
            rows = db.execute(
                select(t.logs.c.line)
                .where(t.logs.c.job == job_id)
                .order_by(t.logs.c.id.desc())
                .limit(lines)
            ).all()
        return [r.line for r in reversed(rows)]

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        with self._single.connect() as db:
            rows = db.execute(
                select(t.metrics.c.data).where(t.metrics.c.job == job_id).order_by(t.metrics.c.id)
            ).all()
        return [dict(r.data) for r in rows]


def _job(row: Any, with_spec: bool = True) -> Job:
    return Job(
        id=row.id,
        name=row.name,
        user=row.user,
        team=row.team,
        state=row.state,
        priority=row.priority,
        spec=dict(row.spec or {}) if with_spec else {},
        demand=Resources(cpus=row.cpus, memory_mib=row.memory_mib, gpus=row.gpus),
        attempts=row.attempts,
        max_restarts=row.max_restarts,
        submitted=row.submitted,
        started=row.started,
        ended=row.ended,
        reason=row.reason,
        pid=row.pid,
        cancel_requested=bool(row.cancel_requested),
        preemptible=bool(row.preemptible),
        expected_runtime=row.expected_runtime,
        log_offset=row.log_offset,
        metrics_offset=row.metrics_offset,
    )
