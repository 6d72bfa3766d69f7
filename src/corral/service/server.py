"""``corral server``: the store, the runner, the searches' driver and the app, on one port.

The port is bound here, before anything starts, so a port in use is one clear error and
a free port chosen by the OS (``--port 0``) is known before the URL is printed. The first
start on an empty database creates the team ``admin`` and its user ``admin``, and prints
that user's token once, to the terminal (never to a log).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from corral.errors import CorralError
from corral.runtime.resources import Resources
from corral.service import mlflow_server
from corral.service.api import create_app
from corral.service.isolation import Isolation, Mode
from corral.service.mlflow_auth import Admin, TeamAccess
from corral.service.orphans import die_with
from corral.service.runner import ProcessStarter, Runner
from corral.service.scheduler import Policy
from corral.service.searches import Searches
from corral.service.store import Store
from corral.spec import SparkSpec

log = logging.getLogger("corral.service")


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    db: str
    host: str = "127.0.0.1"
    port: int = 8642
    state_dir: Path
    pool: Resources
    policy: Policy = field(default_factory=Policy)
    #: Run jobs as applications on this Spark cluster instead of local processes.
    spark: SparkSpec | None = None
    #: Team accounts and enforced limits (`corral.service.isolation`).
    isolation: Mode = "auto"
    #: Per team, Spark settings its jobs get and cannot override (`Runner.spark_teams`).
    spark_teams: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Track every job on this MLflow store (`Runner.mlflow_uri`).
    mlflow_uri: str | None = None
    #: An admin of `mlflow_uri`'s basic-auth app: each team then gets its own MLflow user
    #: and permissions (`corral.service.mlflow_auth`).
    mlflow_admin: Admin | None = None
    #: Start an MLflow server with per-team permissions on this port, and track there
    #: (`corral.service.mlflow_server`); exclusive with `mlflow_uri`.
    mlflow_port: int | None = None
    #: The ``mlflow`` program it runs (default: `mlflow_server.default_command`).
    mlflow_command: str | None = None
    #: Processes serving the API on the one port (`serve`); only the first runs the runner.
    api_processes: int = 1


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # inherited by every accepted connection: uvicorn writes a response's headers and body
    # apart, and without it the body waits for the client's delayed ACK, about 40 ms a
    # request (measured: a no-op endpoint 448 -> 2,012 requests/s, docs/benchmarks.md)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CorralError(
                f"port {port} on {host} is in use: stop what holds it, or pass --port"
            ) from None
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def first_admin(store: Store) -> str | None:
    """On an empty database, create the admin team and user; returns the token to show."""
    if store.users():
        return None
    if "admin" not in store.teams():
        store.create_team("admin")
    return store.create_user("admin", "admin", admin=True)[1]


def serve(opts: ServerOptions) -> None:
    """Run until SIGINT/SIGTERM. Jobs keep running when the server stops; the next start
    re-attaches to them.

    With ``api_processes`` N > 1, the port is bound once, here, and N - 1 processes forked
    from this one serve the API on it beside this one, each with its own store (its own
    connections) and app: the kernel hands each connection to one of them. Only this
    process runs the runner, the one scheduler. They are forked before any thread starts
    and after the schema and the first admin exist, with no database connection open;
    each ends with this one (`_ApiProcesses`)."""
    isolation = Isolation.choose(opts.isolation)
    if isolation.warning is not None:
        print(f"corral server: {isolation.warning}", flush=True)
    isolation.prepare_state(opts.state_dir)  # before the database file is created
    sock = bind(opts.host, opts.port)
    try:
        store = Store(opts.db)
    except Exception as exc:
        sock.close()
        raise CorralError(f"cannot open the database: {type(exc).__name__}: {exc}") from None
    token = first_admin(store)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        mlflow_uri, access, started = _mlflow(opts)
    except BaseException:
        sock.close()
        store.close()
        raise
    try:
        _serve(opts, sock, store, isolation, token, mlflow_uri, access)
    finally:
        if started is not None:
            started.stop()


def _mlflow(
    opts: ServerOptions,
) -> tuple[str | None, TeamAccess | None, mlflow_server.MlflowServer | None]:
    """Where jobs are tracked, who gives teams their MLflow logins (None: no users there),
    and the MLflow server started for it (None: it runs elsewhere, or there is none).

    The admin's login goes into this process's environment, MLflow's client's only way to
    take one: the searches' driver makes the parent runs in the teams' experiments. The
    runner hands each job its team's login instead (`ProcessStarter`)."""
    started = None
    if opts.mlflow_port is not None:
        started = mlflow_server.start(opts.mlflow_port, opts.state_dir, opts.mlflow_command)
        uri, admin = started.uri, started.admin
        print(
            f"corral server: MLflow on {uri}, each team's runs readable by the team only "
            f"(its files and log: {started.log.parent})",
            flush=True,
        )
    elif opts.mlflow_uri is not None and opts.mlflow_admin is not None:
        uri, admin = opts.mlflow_uri, opts.mlflow_admin
    else:
        return opts.mlflow_uri, None, None
    access = TeamAccess(uri, admin, kept=opts.state_dir / "mlflow" / "teams.json")
    try:
        access.check()
    except BaseException:
        if started is not None:
            started.stop()
        raise
    os.environ["MLFLOW_TRACKING_USERNAME"] = admin.username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = admin.password
    return uri, access, started


def _serve(
    opts: ServerOptions,
    sock: socket.socket,
    store: Store,
    isolation: Isolation,
    token: str | None,
    mlflow_uri: str | None,
    access: TeamAccess | None,
) -> None:
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    if token is not None:
        print(
            f"created user 'admin' (team 'admin'). Its token, shown only this once:\n"
            f"  {token}\nlog in with: corral login {url}",
            flush=True,
        )
    runner = Runner(
        store,
        pool=opts.pool,
        state_dir=opts.state_dir,
        policy=opts.policy,
        spark=opts.spark,
        start_attempt=ProcessStarter(isolation, mlflow=access),
        spark_teams=opts.spark_teams,
        mlflow_uri=mlflow_uri,
    )
    # uvicorn shuts down on SIGTERM and then raises it again for the handler it found:
    # make that an exit, so the runner and the store are closed below, not killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    others = _ApiProcesses()
    app_mlflow = _AppMlflow(mlflow_uri, access)
    try:
        if opts.api_processes > 1:
            # what a submit imports on its first call (opening a job's data: pyarrow, about
            # 0.15 s), once here for all: each process would pay it on its own first submit
            import corral.data.parquet  # noqa: F401

            store.close()  # no connection open at the fork: none is shared
            others.fork(
                opts.api_processes - 1, lambda: _serve_api(sock, opts, isolation, app_mlflow)
            )
        runner.start()
        # the searches' driver, beside the runner: one per service, as the scheduler is
        searches = Searches(
            store,
            pool=opts.pool,
            mlflow_uri=mlflow_uri,
            job_folder=runner.folder,
            kept=opts.state_dir / "searches",
        )
        searches.start()
        where = f"Spark at {opts.spark.master}" if opts.spark else "this machine"
        how = "as their teams' accounts" if isolation.accounts else "as this server's user"
        served = f"; {opts.api_processes} API processes" if opts.api_processes > 1 else ""
        print(
            f"corral server on {url} (pool: {opts.pool.cpus:g} CPUs, "
            f"{opts.pool.memory_mib} MiB, {opts.pool.gpus} GPUs; jobs run on {where}, "
            f"{how}{served})",
            flush=True,
        )
        try:
            _run_app(sock, store, opts, isolation, runner.folder, app_mlflow)
        finally:
            searches.stop()
            runner.stop()
    finally:
        others.stop()
        store.close()


def _run_app(
    sock: socket.socket,
    store: Store,
    opts: ServerOptions,
    isolation: Isolation,
    job_folder: Callable[[str], Path],
    mlflow: _AppMlflow,
) -> None:
    """Serve the API and the UI on `sock` until a signal stops uvicorn."""
    import uvicorn

    app = create_app(
        store,
        pool=opts.pool,
        policy=opts.policy,
        job_folder=job_folder,
        mlflow_uri=mlflow.uri,
        mlflow=mlflow.access,
    )
    app.state.isolation_warning = isolation.warning
    # anyio's 40 worker threads are kept: 4 or 8 per process measured no better (docs)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    if opts.api_processes > 1:  # one connection per wake-up: shared among the processes
        config.backlog = 1
        shared = _Shared.of(sock)
        sock.close()  # the copy uvicorn serves is the one it closes when it stops
        sock = shared
    uvicorn.Server(config).run(sockets=[sock])


class _Shared(socket.socket):
    """The listening socket as one of several processes serves it. asyncio accepts as many
    connections as its ``backlog`` at each wake-up (uvicorn: 2,048), so the process that
    wakes first took a burst of new connections, up to all of them, and held them for good
    (HTTP keep-alive): measured, 35 of 46 at once went to one of two processes. With a
    backlog of 1 each takes one and goes back to its loop, and a busy process, whose loop
    wakes late, takes fewer. asyncio also passes its backlog to ``listen``: here the
    kernel's queue stays as uvicorn's default makes it."""

    #: The kernel's queue of connections not yet accepted (uvicorn's default backlog).
    QUEUE = 2048

    @classmethod
    def of(cls, sock: socket.socket) -> _Shared:
        return cls(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))

    def listen(self, backlog: int = QUEUE) -> None:
        super().listen(self.QUEUE)


@dataclass(frozen=True)
class _AppMlflow:
    """What the app says of MLflow (`corral mlflow-login`): where, and who gives logins."""

    uri: str | None
    access: TeamAccess | None


def _serve_api(
    sock: socket.socket, opts: ServerOptions, isolation: Isolation, mlflow: _AppMlflow
) -> None:
    """An API process's life, after the fork: its own store and app on the inherited
    socket, no runner. Its jobs' folders are the runner's (`Runner.folder`, by path)."""
    store = Store(opts.db)
    try:
        folders = Runner(store, pool=opts.pool, state_dir=opts.state_dir)
        _run_app(sock, store, opts, isolation, folders.folder, mlflow)
    finally:
        store.close()


class _ApiProcesses:
    """The API processes forked beside the server's own: started before any thread, ended
    and reaped with it (`stop`), and each ends by itself if it is killed (`orphans.die_with`).

    One that ends early is reported (one line) and not replaced: the others, this one's
    included, go on serving the port. A new one would be forked from a process that then
    runs threads (the runner's, uvicorn's workers), which a fork does not copy: whatever
    lock one of them held would stay taken forever in the child."""

    #: How long the processes have to finish the requests they hold, once told to stop.
    GRACE_S = 10.0

    def __init__(self) -> None:
        self.pids: set[int] = set()
        #: How many were forked, beside this process.
        self.started = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def fork(self, count: int, serve: Callable[[], None]) -> None:
        alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if alive:
            raise CorralError(f"cannot fork the API processes while threads run: {alive}")
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        for _ in range(count):
            pid = os.fork()
            if pid == 0:
                _child(parent, serve)
            self.pids.add(pid)
            self.started += 1
        self._watch = threading.Thread(target=self._watching, name="corral-api-procs", daemon=True)
        self._watch.start()

    def _watching(self) -> None:
        while not self._stopping.wait(0.5):
            for pid, status in self._reap():
                log.warning(
                    "corral server: API process %d ended (%s); %d of %d serve the API on",
                    pid,
                    _how(status),
                    len(self.pids) + 1,
                    self.started + 1,
                )

    def _reap(self) -> list[tuple[int, int]]:
        """The processes that have ended since, with their wait status; forgotten here."""
        ended = []
        with self._lock:
            for pid in sorted(self.pids):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: ended all the same
                    done, status = pid, 0
                if done:
                    self.pids.discard(pid)
                    ended.append((pid, status))
        return ended

    def stop(self) -> None:
        """Tell every process to stop (SIGTERM: uvicorn finishes what it holds), wait for
        them up to `GRACE_S`, kill what is left and reap it all: none outlives this one."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.GRACE_S
        while self.pids and time.monotonic() < deadline:
            self._reap()
            if self.pids:
                time.sleep(0.02)
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.pids.discard(pid)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _child(parent: int, serve: Callable[[], None]) -> NoReturn:
    """A forked API process: `serve`, then leave without the parent's clean-up (its
    `finally` blocks and atexit handlers are the parent's to run, once)."""
    code = 1
    try:
        die_with(parent)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        serve()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
