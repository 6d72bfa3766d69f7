"""``corral server``: the store, the runner and the app, on one port.

The port is bound here, before anything starts, so a port in use is one clear error and
a free port chosen by the OS (``--port 0``) is known before the URL is printed. The first
start on an empty database creates the team ``admin`` and its user ``admin``, and prints
that user's token once, to the terminal (never to a log).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import CorralError
from corral.runtime.resources import Resources
from corral.service.api import create_app
from corral.service.isolation import Isolation, Mode
from corral.service.runner import ProcessStarter, Runner
from corral.service.scheduler import Policy
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
    re-attaches to them."""
    import uvicorn

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
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    if token is not None:
        print(
            f"created user 'admin' (team 'admin'). Its token, shown only this once:\n"
            f"  {token}\nlog in with: corral login {url}",
            flush=True,
        )
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(
        store,
        pool=opts.pool,
        state_dir=opts.state_dir,
        policy=opts.policy,
        spark=opts.spark,
        start_attempt=ProcessStarter(isolation),
        spark_teams=opts.spark_teams,
        mlflow_uri=opts.mlflow_uri,
    )
    runner.start()
    app = create_app(store, pool=opts.pool, policy=opts.policy, job_folder=runner.folder)
    app.state.isolation_warning = isolation.warning
    where = f"Spark at {opts.spark.master}" if opts.spark else "this machine"
    how = "as their teams' accounts" if isolation.accounts else "as this server's user"
    print(
        f"corral server on {url} (pool: {opts.pool.cpus:g} CPUs, {opts.pool.memory_mib} MiB, "
        f"{opts.pool.gpus} GPUs; jobs run on {where}, {how})",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    # uvicorn shuts down on SIGTERM and then raises it again for the handler it found:
    # make that an exit, so the runner and the store are closed below, not killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        runner.stop()
        store.close()
