"""``corral server --mlflow-port``: an MLflow server with per-user permissions, beside it.

MLflow's tracking server runs from a venv of its own (``./.venv-mlflow``, which
``scripts/setup`` makes): the full ``mlflow`` package pins other versions of pyarrow,
cryptography and graphql-core than corral's venv holds, which keeps ``mlflow-skinny``, the
client. It runs MLflow's ``basic-auth`` app, so every request needs a user and each
experiment has its own permissions (`corral.service.mlflow_auth` gives them), with:

* everything under ``STATE/mlflow/``: the runs (SQLite), their artifacts, the users and
  permissions (SQLite), and its log;
* ``default_permission = NO_PERMISSIONS``: a user reads only what they were granted;
* an admin of corral's, ``corral-admin``, whose random password (and the app's CSRF key)
  is made on the first start and kept in ``STATE/mlflow/secrets.json``, mode 0600. It is
  handed to MLflow in its environment, never on a command line (``/proc/*/cmdline`` is
  readable by every local user) and never printed.

MLflow's command is a process tree (its CLI, then uvicorn), so it runs under a guard of
its own process group (``python -m corral.service.mlflow_server PARENT -- COMMAND…``)
that ends the whole group when told to stop, and when the server ends, however it ends
(`corral.service.orphans.die_with`): no MLflow process outlives the server.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from corral.errors import CorralError
from corral.service.mlflow_auth import Admin
from corral.service.orphans import die_with

#: The MLflow user corral manages the others as.
ADMIN_USER = "corral-admin"
#: Seconds MLflow has to answer after it starts (about 16 s measured on a busy 2-core
#: machine: it imports its whole server, then runs its database migrations).
START_TIMEOUT_S = 180.0
#: Seconds MLflow's processes have to end once told to, before they are killed.
STOP_GRACE_S = 10.0
#: The variables that would give MLflow, or a job, a login that is not theirs.
_LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def default_command() -> str:
    """``.venv-mlflow/bin/mlflow`` of this checkout (``scripts/setup`` makes it), else
    ``mlflow`` on PATH."""
    beside = Path(__file__).resolve().parents[3] / ".venv-mlflow" / "bin" / "mlflow"
    if beside.exists():
        return str(beside)
    found = shutil.which("mlflow")
    if found is None:
        raise CorralError(
            "--mlflow-port: no MLflow server to run: run scripts/setup (it makes "
            "./.venv-mlflow), or pass --mlflow-command PATH"
        )
    return found


@dataclass
class MlflowServer:
    """The MLflow server this corral server started: where it answers, its admin, and the
    guard of its process group."""

    uri: str
    admin: Admin
    guard: subprocess.Popen[bytes] = field(repr=False)
    log: Path

    def stop(self) -> None:
        """SIGTERM the whole group, SIGKILL what is left after `STOP_GRACE_S`; reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.guard.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.guard.wait(STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.guard.pid, signal.SIGKILL)
        self.guard.wait()


def start(port: int, state_dir: Path, command: str | None = None) -> MlflowServer:
    """Start MLflow on 127.0.0.1:`port` with its files under `state_dir`, and wait until it
    answers.

    Raises:
        CorralError: the port is in use, there is no MLflow to run, or it ended or did not
            answer in time (with the last line of its log).
    """
    _check_free(port)
    program = command or default_command()
    folder = state_dir / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    kept = _secrets(folder / "secrets.json")
    config = folder / "basic_auth.ini"
    _write_private(config, _auth_config(folder))
    env = {k: v for k, v in os.environ.items() if k not in _LOGIN_VARIABLES}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": kept["admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": kept["secret_key"],
    }
    argv = [program, "server", "--app-name", "basic-auth", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    argv += ["--artifacts-destination", str(folder / "artifacts")]
    log = folder / "log"
    guard_argv = [sys.executable, "-m", "corral.service.mlflow_server", str(os.getpid()), "--"]
    with log.open("ab") as out:
        try:
            guard = subprocess.Popen(
                [*guard_argv, *argv],
                env=env,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise CorralError(f"--mlflow-command {program}: {exc.strerror}") from None
    server = MlflowServer(
        f"http://127.0.0.1:{port}", Admin(ADMIN_USER, kept["admin_password"]), guard, log
    )
    _wait_until_it_answers(server, port)
    return server


def _check_free(port: int) -> None:
    """Refuse a port something listens on (a connection of the last MLflow there, waiting
    out its TIME_WAIT, is no obstacle: uvicorn binds with SO_REUSEADDR too)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise CorralError(f"--mlflow-port {port}: {why}") from None


def _wait_until_it_answers(server: MlflowServer, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.guard.poll() is not None:
            server.stop()
            raise CorralError(
                f"--mlflow-port {port}: MLflow ended as it started "
                f"(exit code {server.guard.returncode}): {_last_line(server.log)}; "
                f"its log: {server.log}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.uri}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    server.stop()
    raise CorralError(
        f"--mlflow-port {port}: MLflow did not answer in {START_TIMEOUT_S:g} s; "
        f"its log: {server.log}"
    )


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "it printed nothing"


def _auth_config(folder: Path) -> str:
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": f"sqlite:///{folder / 'basic_auth.db'}",
        "admin_username": ADMIN_USER,
    }
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def _secrets(path: Path) -> dict[str, str]:
    """The admin's password and the app's CSRF key: made on the first start, then kept
    (MLflow takes the admin's password only when it creates the admin)."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        made = {"admin_password": secrets.token_urlsafe(24), "secret_key": secrets.token_hex(32)}
        _write_private(path, json.dumps(made))
        return made


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this account only (0600) from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


def guard(parent: int, command: list[str]) -> int:
    """Run `command` in this process's group, and end the whole group (MLflow's CLI and
    the uvicorn it starts) when told to, or when `parent` ends."""
    die_with(parent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    child = subprocess.Popen(command)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(0, signal.SIGTERM)
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m corral.service.mlflow_server PARENT -- COMMAND...")
    sys.exit(guard(int(argv[0]), argv[2:]))


if __name__ == "__main__":
    main(sys.argv[1:])
