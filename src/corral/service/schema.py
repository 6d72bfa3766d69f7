"""The service's tables, as SQLAlchemy Core metadata: the schema the newest Alembic
migration (``migrations/versions``) leaves.

A job row holds its spec as validated JSON and its whole-job demand (the scheduler's unit),
so a scheduling pass reads one table. Every change of a job's state is also a row of
`events`, with its time and reason: the job page's timeline and the audit trail of
restarts; each event also says how many of the job's ``max_restarts`` it spent, so the
runner counts them with a sum, never by reading reasons. Log lines and metrics are rows
too, so a restarted server, or another replica on the same PostgreSQL, serves them
without the job's files; how far the runner has copied each of the job's files is kept
on the job's row, written in the transaction that adds the lines, so a server killed at
any instant copies each line once.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

teams = Table(
    "teams",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created", Float, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("team", String(64), ForeignKey("teams.name"), nullable=False),
    Column("admin", Boolean, nullable=False, default=False),
    # sha256 of the token: tokens are 256 random bits, so a slow password hash adds nothing
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created", Float, nullable=False),
)

quotas = Table(
    "quotas",
    metadata,
    Column("team", String(64), ForeignKey("teams.name"), primary_key=True),
    Column("cpus", Float, nullable=True),
    Column("memory_mib", BigInteger, nullable=True),
    Column("gpus", Integer, nullable=True),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("user", String(64), ForeignKey("users.name"), nullable=False),
    Column("team", String(64), ForeignKey("teams.name"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("spec", JSON, nullable=False),
    Column("cpus", Float, nullable=False),
    Column("memory_mib", BigInteger, nullable=False),
    Column("gpus", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_restarts", Integer, nullable=False, default=0),
    Column("submitted", Float, nullable=False),
    Column("started", Float, nullable=True),
    Column("ended", Float, nullable=True),
    Column("reason", Text, nullable=False, default=""),
    Column("pid", Integer, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # the client's key for this submission: a retried POST finds the job it made
    Column("client_key", String(64), nullable=True),
    # may be stopped (after its last checkpoint) and requeued for a higher-priority job
    Column("preemptible", Boolean, nullable=False, default=False),
    # seconds the submitter expects it to run: lets backfill start it in a hole
    Column("expected_runtime", Float, nullable=True),
    # bytes of the job's log and metrics files already copied into `logs` and `metrics`
    Column("log_offset", BigInteger, nullable=False, default=0),
    Column("metrics_offset", BigInteger, nullable=False, default=0),
    UniqueConstraint("user", "client_key", name="jobs_user_client_key"),
    Index("jobs_state", "state"),
    Index("jobs_team_state", "team", "state"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", String(16), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    # how many of the job's max_restarts this change spent: a restart of its process, or
    # the restarts its own launcher made inside the attempt that ended here
    Column("restarts", Integer, nullable=False, default=0),
)

logs = Table(
    "logs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", String(16), ForeignKey("jobs.id"), nullable=False),
    Column("line", Text, nullable=False),
    Index("logs_job_id", "job", "id"),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", String(16), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("data", JSON, nullable=False),
)

searches = Table(
    "searches",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("user", String(64), ForeignKey("users.name"), nullable=False),
    Column("team", String(64), ForeignKey("teams.name"), nullable=False),
    Column("state", String(16), nullable=False),
    # the search as submitted: {"spec": job, "space": …, "settings": …}, validated
    Column("request", JSON, nullable=False),
    Column("created", Float, nullable=False),
    Column("ended", Float, nullable=True),
    Column("reason", Text, nullable=False, default=""),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    UniqueConstraint("user", "name", name="searches_user_name"),
    Index("searches_state", "state"),
)

# a search's Optuna study, as Optuna's journal: its log of operations, in order
search_journal = Table(
    "search_journal",
    metadata,
    Column("search", String(16), ForeignKey("searches.id"), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("data", JSON, nullable=False),
)
