"""Claim: the job service takes 1,000 submissions from 20 concurrent clients and stores each
job exactly once, retries included.

Starts a real ``corral server`` (a subprocess, ``--port 0``, ``--api-processes``: 2 unless
told, the best measured on 2 cores) on a fresh database: a SQLite file by default, or,
with ``--db postgresql://user@host/db``, a database created for the run on that
PostgreSQL server (and dropped after). Through its REST API, as the admin it
creates on first start, it makes a team ``load`` with a user ``loader``. Then ``--clients``
threads, each with its own ``httpx.Client``, submit ``--jobs`` jobs in all, each with a
unique ``client_key``. About ``--retry`` of the submissions are sent twice with the same
key: half of them again after the reply (a client that lost it), half from a second
connection at the same moment (a client that timed out and resent while the first request
was still in flight), so two inserts race on the store's unique key. The clients run in
this process, on the same cores as the server: their time is part of the latency
measured, as it is for any client on the server's machine. The clock starts once every
client is ready, as for a server that has been running: its ``httpx.Client``s made, one
``GET /api/me`` sent on each connection (the server then holds a database connection per
concurrent request), and one submission made before, which the server refuses (its first
imports what opening data and planning a job need).

Nothing trains. The point is the submit path (auth, spec validation, admission, insert)
and the storage, not job processes: a pool of 1 CPU / 1 GiB, and a job of the admin's team
``holder`` that holds all of it, written as ``running`` straight into the store (as a job
run by another replica on the same database would look: no process of this server's), with
a quota of 0 CPUs for ``holder`` so that the runner could not launch it in the instant
before. Every submitted job asks for 1 CPU and 512 MiB: admissible (it fits the pool and the
team's quota), so it is queued and stays queued. Its data is a small Parquet file the run
writes, which the service opens at submit. The runner still runs a scheduling pass over the
growing queue every 0.5 s, as in production.

Verifies, through ``GET /api/jobs?all_states=true`` as the admin and in the ``jobs`` table
of the same database (read through SQLAlchemy at its URL), that every job is stored exactly
once: ``--jobs`` distinct jobs, no ``client_key`` twice, one ``submitted`` event each, and
every retry answered with the job its key made.

In the same run, two floors. The storage layer's: the same inserts done directly through
``Store.add_job`` from ``--clients`` threads, no HTTP, on a second fresh database of the
same kind, after the server has stopped. And the HTTP stack's: the same requests from the
same clients to a no-op ``POST /api/jobs`` (uvicorn as ``corral server`` runs it, from as
many processes, the same middleware and body model, no token check, no store), which
bounds what any store behind that stack could reach on this machine. For each, where the
CPU went: milliseconds per request in the server's processes, in the clients, in
PostgreSQL's processes (a local server), and the requests/s those allow (all of it on the
machine's cores, or the server's share on the cores its processes can use: one each, for
its GIL, at most the machine's), and how many cores were busy meanwhile (with these
processes, and with anything: what else ran on the machine shows there). It also times
the scheduling pass of ``bench/schedule_pass.py`` (10,000 queued jobs of 100 teams;
target < 100 ms), and the runner's pass on this store (``cluster_state()`` read from the
database, then ``schedule()``), which ran every 0.5 s during the load.

Run: ``.venv/bin/python bench/service_load.py`` (SQLite), or
``.venv/bin/python bench/service_load.py --db postgresql://postgres@127.0.0.1:5432/test``
(``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import queue
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, func, make_url, select, text

from corral.runtime.resources import Resources
from corral.service import schema as t
from corral.service.cluster import cluster_state
from corral.service.scheduler import Policy, schedule
from corral.service.store import Store, User

sys.path.insert(0, str(Path(__file__).parent))
try:
    import schedule_pass  # the scheduling bench: called, not copied
except ImportError as exc:  # that script broken must not hide the load numbers
    schedule_pass = None  # type: ignore[assignment]
    SCHEDULE_PASS_ERROR = f"{type(exc).__name__}: {exc}"

#: The pool the server schedules: one job of the size below could run, were it free.
POOL = Resources(cpus=1, memory_mib=1024, gpus=0)
#: The jobs' spec; its data path is set to a small Parquet file the run writes (the
#: service opens a job's data at submit, as ``corral train`` would, and refuses it missing).
SPEC: dict[str, Any] = {
    "entrypoint": "examples.digits:make_model",
    "data": {"path": "/absent/train.parquet", "label": "y"},
    "roles": {"worker": {"count": 1, "cpus": 1, "memory": "512m"}},
}
DEMAND = Resources(cpus=1, memory_mib=512, gpus=0)
#: The server's ``--api-processes`` unless told (``--api-processes``): the best measured
#: on the 2-core machine of docs/benchmarks.md.
API_PROCESSES = 2


@dataclass
class Sent:
    key: str
    kind: str  # "first", "retry after the reply", "racing retry"
    ms: float
    status: int
    job_id: str | None


def write_data(folder: Path) -> None:
    """The jobs' training data: a two-row Parquet file in `folder`, named in `SPEC`."""
    import pandas as pd

    path = folder / "train.parquet"
    pd.DataFrame({"a": [0.0, 1.0], "y": [0, 1]}).to_parquet(path)
    SPEC["data"] = {"path": str(path), "label": "y"}


def kind_of(db: str) -> str:
    """SQLite or PostgreSQL, as the table names it."""
    return "SQLite" if make_url(db).get_backend_name() == "sqlite" else "PostgreSQL"


@contextlib.contextmanager
def databases(db: str | None, tmp: Path) -> Iterator[tuple[str, str]]:
    """Two fresh databases of the same kind: the server's, and the floor's.

    Without `db`, SQLite files in `tmp`, as the bench always used. A SQLite URL names the
    server's file (it must not exist yet); the floor's is beside it. A PostgreSQL URL names
    the server and the credentials: two databases are created there (``CREATE DATABASE``,
    from a connection to the database the URL names, which is never written) and dropped
    after the run."""
    if db is None:
        yield f"sqlite:///{tmp}/service.db", f"sqlite:///{tmp}/floor.db"
        return
    url = make_url(db)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        floor_path = path.with_name(f"{path.stem}-floor{path.suffix}")
        for taken in (path, floor_path):
            if taken.exists():
                raise SystemExit(f"{taken} exists: the bench needs a fresh database")
        yield db, url.set(database=str(floor_path)).render_as_string(hide_password=False)
        return
    if url.drivername == "postgresql":  # psycopg 3, as `Store` uses
        url = url.set(drivername="postgresql+psycopg")
    names = [f"corral_load_{secrets.token_hex(4)}"]
    names.append(f"{names[0]}_floor")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        made = make_url(db)
        yield (
            made.set(database=names[0]).render_as_string(hide_password=False),
            made.set(database=names[1]).render_as_string(hide_password=False),
        )
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _serve(argv: list[str], log: Path, ready: str) -> tuple[subprocess.Popen[str], str, str | None]:
    """Start `argv` and wait for the line matching `ready` (its URL); returns the process,
    the URL and the token it printed before, if any."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with log.open("w") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    token, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.strip().startswith("crl_"):
            token = line.strip()
        if m := re.match(ready, line):
            return proc, m.group(1), token
    _stop(proc)
    raise SystemExit(f"{argv} did not start; its output is in {log}:\n{log.read_text()}")


def start_server(
    db: str, state_dir: Path, log: Path, processes: int
) -> tuple[subprocess.Popen[str], str, str]:
    """`corral server` on a free port, serving the API from `processes` processes; returns
    it, its URL and the admin token it printed."""
    argv = [sys.executable, "-m", "corral", "server", "--port", "0", "--db", db]
    argv += ["--state-dir", str(state_dir), "--cpus", f"{POOL.cpus:g}"]
    argv += ["--api-processes", str(processes)]
    argv += ["--memory", f"{POOL.memory_mib}m", "--gpus", str(POOL.gpus)]
    proc, url, token = _serve(argv, log, r"corral server on (http://\S+)")
    if token is None:
        stop_server(proc, db, state_dir)
        raise SystemExit(f"the server printed no admin token; its output is in {log}")
    return proc, url, token


def serve_noop(processes: int) -> None:
    """The HTTP stack alone (``--serve-noop``): uvicorn as `corral server` runs it (from
    as many processes, forked as it forks them), the app's body-size middleware, and a
    sync ``POST /api/jobs`` that validates the same `SubmitRequest` and answers 201 with a
    `JobOut`, touching no store and asking no token."""
    import uvicorn
    from fastapi import FastAPI, status

    from corral.service.api import _BodyLimit
    from corral.service.models import Demand, JobOut, SubmitRequest
    from corral.service.server import _ApiProcesses, bind

    app = FastAPI()
    app.add_middleware(_BodyLimit)

    @app.post("/api/jobs", status_code=status.HTTP_201_CREATED)
    def submit(body: SubmitRequest) -> JobOut:
        key = body.client_key or "none"
        return JobOut(
            id=key, name=key, user="loader", team="load", state="queued", priority=0,
            demand=Demand(cpus=1, memory_mib=512, gpus=0), attempts=0, max_restarts=0,
            submitted=time.time(), started=None, ended=None, reason="submitted",
            preemptible=False, url=f"http://127.0.0.1/jobs/{key}",
        )  # fmt: skip

    sock = bind("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    print(f"no-op server on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    others = _ApiProcesses()
    try:
        others.fork(processes - 1, lambda: uvicorn.Server(config).run(sockets=[sock]))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        others.stop()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_server(proc: subprocess.Popen[str], db: str, state_dir: Path) -> int:
    """Stop the server, then any job process it started (none should have); returns how
    many jobs the store gives a pid (a process was started for them)."""
    _stop(proc)
    url = make_url(db)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        return 0
    store = Store(db)
    try:
        with store.engine.connect() as conn:
            pids = list(conn.scalars(select(t.jobs.c.pid).where(t.jobs.c.pid.is_not(None))))
    finally:
        store.close()
    for pid in pids:
        try:  # only a job process of this run: its command line names our state folder
            if str(state_dir).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return len(pids)


def setup(url: str, admin: str, db: str) -> str:
    """Teams, users and the job that holds the pool; returns the loader's token."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as api:
        for team in ("load", "holder"):
            api.post("/api/admin/teams", json={"name": team}).raise_for_status()
        made = api.post("/api/admin/users", json={"name": "loader", "team": "load"})
        made.raise_for_status()
        api.post("/api/admin/users", json={"name": "holder", "team": "holder"}).raise_for_status()
        api.put("/api/admin/quotas/holder", json={"cpus": 0}).raise_for_status()
        # The server's first submission imports what opening the data and planning the job
        # need (pyarrow, the strategies): about 0.2 s, once per process, which all the
        # clients' first requests would wait on. One that is refused (it could never fit
        # the pool), so nothing is stored, pays it before the clock.
        too_big = {**SPEC, "roles": {"worker": {"count": 2, "cpus": 1, "memory": "512m"}}}
        refused = api.post("/api/jobs", json={"spec": too_big})
        assert refused.status_code == 422, refused.text
    store = Store(db)
    try:
        job, _ = store.add_job(
            user=User("holder", "holder", False), name="holder", spec=SPEC, demand=POOL
        )
        store.transition(job.id, ["queued"], "running", "holds the pool", started=time.time())
    finally:
        store.close()
    return str(made.json()["token"])


def plan(clients: int, jobs: int, retry: float, seed: int) -> list[list[tuple[str, str | None]]]:
    """Per client: (client_key, retry kind or None), the jobs dealt round-robin."""
    rng = random.Random(seed)
    per: list[list[tuple[str, str | None]]] = [[] for _ in range(clients)]
    racing = False
    for n in range(jobs):
        kind = None
        if rng.random() < retry:
            kind = "racing retry" if racing else "retry after the reply"
            racing = not racing
        per[n % clients].append((f"load-{n:05d}", kind))
    return per


def _family(pid: int) -> list[int]:
    """`pid` and its child processes (Linux's /proc/<pid>/task/*/children): the server and
    its API processes (it starts no job here)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def submit_all(
    url: str, token: str, work: list[list[tuple[str, str | None]]], server: int
) -> tuple[list[Sent], float, Cpu, list[float]]:
    """Every client's submissions; returns them, the wall time and the CPU they took, from
    the moment all clients are ready to the last answer, and the latencies of their warm-up.

    Ready: its `httpx.Client`s made (milliseconds each) and one ``GET /api/me`` sent on
    each, all clients at once, before the clock starts: their connections are open and
    the server holds a database connection per concurrent request, as a server that has
    been running does. Measured without it, the first request of each client (2% of them:
    the p99) waits on the server opening those connections, which is a start-up cost."""
    sent: list[Sent] = []
    warm: list[float] = []
    lock = threading.Lock()
    ready, start = threading.Barrier(len(work)), threading.Barrier(len(work) + 1)

    def post(api: httpx.Client, key: str, kind: str) -> Sent:
        body = {"spec": {**SPEC, "name": key}, "client_key": key}
        begin = time.perf_counter()
        reply = api.post("/api/jobs", json=body)
        ms = 1000 * (time.perf_counter() - begin)
        job_id = reply.json().get("id") if reply.status_code == 201 else None
        return Sent(key, kind, ms, reply.status_code, job_id)

    def twin_post(api: httpx.Client, key: str, out: list[Sent]) -> None:
        out.append(post(api, key, "racing retry"))

    def client(mine: list[tuple[str, str | None]]) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with (
            httpx.Client(base_url=url, headers=headers, timeout=60) as api,
            httpx.Client(base_url=url, headers=headers, timeout=60) as second,
        ):
            done: list[Sent] = []
            ready.wait()
            for each in (api, second):
                begin = time.perf_counter()
                each.get("/api/me")
                with lock:
                    warm.append(1000 * (time.perf_counter() - begin))
            start.wait()
            for key, kind in mine:
                if kind == "racing retry":
                    twin: list[Sent] = []
                    other = threading.Thread(target=twin_post, args=(second, key, twin))
                    other.start()
                    done.append(post(api, key, "first"))
                    other.join()
                    done += twin
                    continue
                done.append(post(api, key, "first"))
                if kind is not None:
                    done.append(post(api, key, kind))
            with lock:
                sent.extend(done)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in work]
    for thread in threads:
        thread.start()
    start.wait()
    pids = _family(server)  # the API processes are forked before the server says it is up
    cpu, begin = Cpu.now(pids), time.perf_counter()
    for thread in threads:
        thread.join()
    return sent, time.perf_counter() - begin, Cpu.now(pids) - cpu, warm


def floor(db: str, clients: int, jobs: int) -> tuple[float, list[float], Cpu]:
    """The same inserts through `Store.add_job` from `clients` threads: wall s, latencies,
    CPU (taken before the store closes: PostgreSQL's backends end with their connections)."""
    store = Store(db)
    store.create_team("load")
    user, _ = store.create_user("loader", "load")
    keys = [f"load-{n:05d}" for n in range(jobs)]
    times: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def insert(mine: list[str]) -> None:
        local = []
        start.wait()
        for key in mine:
            begin = time.perf_counter()
            store.add_job(
                user=user, name=key, spec={**SPEC, "name": key}, demand=DEMAND, client_key=key
            )
            local.append(1000 * (time.perf_counter() - begin))
        with lock:
            times.extend(local)

    threads = [threading.Thread(target=insert, args=(keys[c::clients],)) for c in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    cpu, begin = Cpu.now([]), time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    cpu = Cpu.now([]) - cpu
    assert store.count_jobs() == jobs
    store.close()
    return wall, times, cpu


def verify_api(url: str, admin: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as api:
        reply = api.get("/api/jobs", params={"all_states": "true", "limit": 10_000})
        reply.raise_for_status()
    return [j for j in reply.json() if j["user"] == "loader"]


def verify_store(db: str) -> tuple[int, int, int, int, int]:
    """Loader's jobs, distinct client keys, keys stored more than once, 'submitted' events,
    jobs no longer queued."""
    store = Store(db)
    try:
        with store.engine.connect() as conn:
            mine = t.jobs.c.user == "loader"
            rows = conn.scalar(select(func.count()).select_from(t.jobs).where(mine))
            keys = conn.scalar(select(func.count(func.distinct(t.jobs.c.client_key))).where(mine))
            twice = conn.scalar(
                select(func.count()).select_from(
                    select(t.jobs.c.client_key)
                    .where(mine)
                    .group_by(t.jobs.c.client_key)
                    .having(func.count() > 1)
                    .subquery()
                )
            )
            events = conn.scalar(
                select(func.count())
                .select_from(t.events.join(t.jobs, t.events.c.job == t.jobs.c.id))
                .where(mine, t.events.c.reason == "submitted")
            )
            left = conn.scalar(
                select(func.count()).select_from(t.jobs).where(mine, t.jobs.c.state != "queued")
            )
    finally:
        store.close()
    return int(rows or 0), int(keys or 0), int(twice or 0), int(events or 0), int(left or 0)


def runner_pass(db: str, passes: int) -> tuple[float, float, int]:
    """The runner's pass on the loaded store: read the cluster state, then schedule."""
    store = Store(db)
    try:
        return schedule_pass.timed(
            lambda: len(schedule(cluster_state(store, POOL), time.time(), Policy())), passes
        )
    finally:
        store.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_s() -> float:
    """CPU seconds of this machine's PostgreSQL processes that are alive (a local server:
    its backends live as long as their connections; any other database's work counts too)."""
    total = 0.0
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "postgres":
                total += _cpu_s(int(entry.name))
    return total


def _machine_s() -> float:
    """CPU seconds this machine's cores spent busy so far, all processes (/proc/stat: all
    but idle and iowait; 0 where unreadable)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Cpu:
    """CPU seconds spent during a timed part: by the server's processes, by this process
    (the clients, or the floor's threads), by PostgreSQL, and by the whole machine (theirs
    and anything else that ran)."""

    server: float = 0.0
    here: float = 0.0
    postgres: float = 0.0
    machine: float = 0.0

    @classmethod
    def now(cls, server: list[int]) -> Cpu:
        """`server`: its processes (none for the store's floor)."""
        return cls(sum(map(_cpu_s, server)), time.process_time(), _postgres_s(), _machine_s())

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.server - other.server,
            self.here - other.here,
            self.postgres - other.postgres,
            self.machine - other.machine,
        )


def pct(values: list[float]) -> tuple[float, float, float, float]:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return float(p50), float(p95), float(p99), max(values)


def row(label: str, wall: float, jobs: int, requests: int, ms: list[float]) -> str:
    return (
        f"| {label} | {wall:.2f} | {jobs / wall:.0f} | {requests / wall:.0f} | "
        + " | ".join(f"{v:.1f}" for v in pct(ms))
        + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--db",
        help="database URL, e.g. postgresql://postgres@127.0.0.1:5432/test: the server "
        "and floor run on fresh databases created there and dropped after (default: "
        "SQLite files in a temporary folder)",
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--retry", type=float, default=0.05, help="share of submissions resent")
    parser.add_argument("--passes", type=int, default=10, help="timed scheduling passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--api-processes",
        type=int,
        default=API_PROCESSES,
        help="the server's --api-processes, and the no-op's (default: %(default)s, the "
        "best measured on a 2-core machine, docs/benchmarks.md)",
    )
    parser.add_argument("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.api_processes)
        return
    work = plan(args.clients, args.jobs, args.retry, args.seed)
    with (
        tempfile.TemporaryDirectory(prefix="corral-load-") as tmp,
        databases(args.db, Path(tmp)) as (db, floor_db),
    ):
        kind, state_dir = kind_of(db), Path(tmp, "state")
        write_data(Path(tmp))
        proc, url, admin = start_server(db, state_dir, Path(tmp, "server.log"), args.api_processes)
        try:
            token = setup(url, admin, db)
            load_before = os.getloadavg()[0]
            sent, wall, cpu, warm = submit_all(url, token, work, proc.pid)
            listed = verify_api(url, admin)
        finally:
            started = stop_server(proc, db, state_dir)
        rows, keys, twice, events, left = verify_store(db)
        ours_pass = runner_pass(db, args.passes) if schedule_pass else None
        floor_wall, floor_ms, floor_cpu = floor(floor_db, args.clients, args.jobs)
        noop, noop_url, _ = _serve(
            [sys.executable, __file__, "--serve-noop", "--api-processes", str(args.api_processes)],
            Path(tmp, "noop.log"),
            r"no-op server on (http://\S+)",
        )
        try:
            noop_sent, noop_wall, noop_cpu, _ = submit_all(noop_url, "none", work, noop.pid)
        finally:
            _stop(noop)
        load_after = os.getloadavg()[0]

    failed = [s for s in sent if s.status != 201]
    by_key: dict[str, set[str | None]] = {}
    for s in sent:
        by_key.setdefault(s.key, set()).add(s.job_id)
    retries = [s for s in sent if s.kind != "first"]
    racing = sum(s.kind == "racing retry" for s in retries)
    same_job = all(len(ids) == 1 for ids in by_key.values())
    listed_ids = {j["id"] for j in listed}
    answered = {next(iter(ids)) for ids in by_key.values() if len(ids) == 1}
    once = (
        not failed
        and same_job
        and len(listed) == len(listed_ids) == args.jobs
        and listed_ids == answered
        and rows == keys == events == args.jobs
        and twice == 0
    )

    print(
        f"\n{platform.node()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        f"`corral server --api-processes {args.api_processes}` on {kind}, "
        f"{args.clients} client threads, {args.jobs} jobs "
        f"+ {len(retries)} retries ({racing} racing the first request); load average "
        f"{load_before:.1f} before the run, {load_after:.1f} after\n"
    )
    print(
        "| path | wall s | jobs/s | requests/s | p50 ms | p95 ms | p99 ms | max ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    n = args.jobs
    ours, base = pct([s.ms for s in sent]), pct(floor_ms)
    print(
        row(
            f"ours: POST /api/jobs on {kind}, {args.clients} clients over HTTP",
            wall,
            n,
            len(sent),
            [s.ms for s in sent],
        )
    )
    print(
        row(
            f"floor: `Store.add_job` on {kind}, {args.clients} threads, no HTTP",
            floor_wall,
            n,
            n,
            floor_ms,
        )
    )
    print(
        row(
            f"floor: HTTP alone, a no-op POST /api/jobs, {args.clients} clients",
            noop_wall,
            n,
            len(noop_sent),
            [s.ms for s in noop_sent],
        )
    )
    print(
        f"| ratio ours / store floor | {wall / floor_wall:.1f}× | | | "
        + " | ".join(f"{a / b:.1f}×" for a, b in zip(ours, base, strict=True))
        + " |"
    )

    start_up = pct(warm)
    print(
        f"\nWarm-up before the clock, {len(warm)} `GET /api/me` at once (two connections per "
        f"client): p50 {start_up[0]:.1f} ms, max {start_up[3]:.1f} ms"
    )
    cores = os.cpu_count() or 1
    usable = min(args.api_processes, cores)
    print(
        f"\nWhere the CPU went, in ms per request: the server's {args.api_processes} "
        "process(es), the clients (this process), PostgreSQL's processes; and the most "
        "requests/s that allows: the cores shared by all, or the server's alone on the "
        f"{usable} core(s) its processes can use (one GIL each, at most one core each); "
        f"and the cores busy during it, of {cores}: with these processes, and with "
        "anything (the rest is other work on the machine, or idle)\n"
    )
    print(
        "| path | server | clients | PostgreSQL | all | bound by the cores, req/s | "
        "bound by the server, req/s | cores busy: these, anything |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for label, used, requests, took in (
        ("ours", cpu, len(sent), wall),
        ("floor: `Store.add_job` (threads in the clients' place)", floor_cpu, n, floor_wall),
        ("floor: HTTP alone (no-op)", noop_cpu, len(noop_sent), noop_wall),
    ):
        each = [1000 * v / requests for v in (used.server, used.here, used.postgres)]
        bound = f"{1000 * usable / each[0]:.0f}" if each[0] else ""
        print(
            f"| {label} | {each[0]:.2f} | {each[1]:.2f} | {each[2]:.2f} | {sum(each):.2f} | "
            f"{1000 * cores / sum(each):.0f} | {bound} | "
            f"{(used.server + used.here + used.postgres) / took:.2f}, {used.machine / took:.2f} |"
        )

    yes = {True: "yes", False: "no"}
    print("\n| check | result |\n|---|---|")
    print(f"| requests answered 201 | {len(sent) - len(failed)} of {len(sent)} |")
    print(f"| every retry answered with the job its key made | {yes[same_job]} |")
    print(
        f"| GET /api/jobs?all_states=true (admin): loader's jobs, distinct ids | "
        f"{len(listed)}, {len(listed_ids)} |"
    )
    print(
        f"| `jobs` table ({kind}, through SQLAlchemy): rows, distinct client keys, keys "
        f"stored twice, 'submitted' events | {rows}, {keys}, {twice}, {events} |"
    )
    print(f"| jobs that left the queue; job processes the server started | {left}; {started} |")
    print(f"| **stored exactly once** | **{yes[once]}** |")
    if failed:
        print(f"\nfailed requests (first 5): {[(s.key, s.kind, s.status) for s in failed[:5]]}")

    if schedule_pass is None or ours_pass is None:
        print(f"\nscheduling passes not timed: bench/schedule_pass.py: {SCHEDULE_PASS_ERROR}")
        return
    typical = schedule_pass.build(10_000, 100, args.seed)
    big_pass = schedule_pass.timed(
        lambda: len(schedule(typical, schedule_pass.NOW, Policy())), args.passes
    )
    print("\n| scheduling pass | target | median ms | worst ms | launches |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| `schedule()`, 10,000 queued jobs of 100 teams (bench/schedule_pass.py) | < 100 ms | "
        f"{big_pass[0]:.1f} | {big_pass[1]:.1f} | {big_pass[2]} |"
    )
    print(
        f"| runner's pass on this store: `cluster_state()` from {kind} + `schedule()`, "
        f"{args.jobs} queued | | {ours_pass[0]:.1f} | {ours_pass[1]:.1f} | {ours_pass[2]} |"
    )


if __name__ == "__main__":
    main()
