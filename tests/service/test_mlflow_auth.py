"""``corral server --mlflow-port``: a real MLflow server with its basic-auth app, started
beside a real corral server, a real job of one team tracked there, and real credentials:
the team's own read its run, another team's get 403, none get 401; no password of the
admin's is printed or logged, and no MLflow process outlives the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import alive, job_spec, start_server, unavailable, wait_until
from typer.testing import CliRunner

from corral.cli import app
from corral.errors import CorralError
from corral.service import mlflow_server
from corral.service.client import CONFIG_ENV, Credentials, save_credentials
from corral.service.job import LOG, SPEC, TRACKING
from corral.service.ui import COOKIE

#: MLflow's start and a job's fit on a busy 2-core machine: about a minute each.
SLOW_S = 240


@pytest.fixture(scope="module")
def mlflow_command() -> str:
    """The ``mlflow`` that ``corral server --mlflow-port`` runs (``scripts/setup`` makes
    ``./.venv-mlflow``: in CI its absence is a failure)."""
    try:
        return mlflow_server.default_command()
    except CorralError as exc:
        unavailable(str(exc))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mlflow_group(state: Path) -> int:
    """The process group of the MLflow server whose files are under `state`: its guard's
    pid (uvicorn's command line names none of corral's paths, but it is in the group)."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"corral.service.mlflow_server" in cmdline and str(state).encode() in cmdline:
            return int(entry.name)
    pytest.fail(f"no MLflow server runs on {state}")


def members(group: int) -> list[int]:
    """The live processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == group:
                found.append(int(entry.name))
        except ProcessLookupError:
            continue
    return [pid for pid in found if alive(pid)]


def call(url: str, token: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kwargs)


def mlflow_get(uri: str, path: str, auth: tuple[str, str] | None, **params) -> int:
    return httpx.get(
        f"{uri}/api/2.0/mlflow/{path}", params=params, auth=auth, timeout=60
    ).status_code


@pytest.mark.slow
def test_a_teams_runs_are_readable_with_its_credentials_only(tmp_path, mlflow_command, monkeypatch):
    port = free_port()
    server, url, admin = start_server(tmp_path, "--cpus", "2", "--mlflow-port", str(port))
    state = tmp_path / "state"
    group = mlflow_group(state)
    try:
        assert admin is not None
        for team in ("vision", "speech"):
            assert call(url, admin, "POST", "/api/admin/teams", json={"name": team}).is_success
        tokens = {}
        for name, team in (("ada", "vision"), ("bob", "speech")):
            made = call(url, admin, "POST", "/api/admin/users", json={"name": name, "team": team})
            tokens[name] = made.json()["token"]

        made = call(
            url,
            tokens["ada"],
            "POST",
            "/api/jobs",
            # the model artifact is not what this test is about, and logging it costs 15 s
            json={"spec": job_spec(tmp_path, epochs=1, tracking={"log_model": False})},
        )
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]

        def state_of() -> str:
            return call(url, tokens["ada"], "GET", f"/api/jobs/{job_id}").json()["state"]

        wait_until(lambda: state_of() in ("succeeded", "failed"), SLOW_S, "the job to end")
        logs = call(url, tokens["ada"], "GET", f"/api/jobs/{job_id}/logs").json()["lines"]
        assert state_of() == "succeeded", "\n".join(logs)

        folder = state / "jobs" / job_id
        tracked = json.loads((folder / TRACKING).read_text())
        uri = f"http://127.0.0.1:{port}"
        assert (
            tracked["url"]
            == f"{uri}/#/experiments/{tracked['experiment_id']}/runs/{tracked['run_id']}"
        )
        page = httpx.get(f"{url}/jobs/{job_id}", cookies={COOKIE: tokens["ada"]}, timeout=60)
        assert tracked["url"] in page.text  # the job page links its run

        # each person's own login, as `corral mlflow-login` prints it
        config = tmp_path / "credentials.json"
        save_credentials(Credentials(url=url, token=tokens["ada"]), config, "ada")
        monkeypatch.setenv(CONFIG_ENV, str(config))
        printed = CliRunner().invoke(app, ["mlflow-login"])
        assert printed.exit_code == 0, printed.output
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in printed.stdout.splitlines()
            if line.startswith("export ")
        )
        assert exports["MLFLOW_TRACKING_URI"] == uri
        assert exports["MLFLOW_TRACKING_USERNAME"] == "user-ada"
        ada = (exports["MLFLOW_TRACKING_USERNAME"], exports["MLFLOW_TRACKING_PASSWORD"])
        login = call(url, tokens["bob"], "POST", "/api/me/mlflow").json()
        assert login["experiment"] == "speech"
        bob = (login["username"], login["password"])

        run, experiment = {"run_id": tracked["run_id"]}, {"experiment_id": tracked["experiment_id"]}
        assert mlflow_get(uri, "runs/get", ada, **run) == 200
        assert mlflow_get(uri, "experiments/get", ada, **experiment) == 200
        assert mlflow_get(uri, "runs/get", bob, **run) == 403
        assert mlflow_get(uri, "experiments/get", bob, **experiment) == 403
        assert mlflow_get(uri, "runs/get", None, **run) == 401
        # READ: a person cannot rewrite the team's runs
        tag = {"run_id": tracked["run_id"], "key": "k", "value": "v"}
        wrote = httpx.post(f"{uri}/api/2.0/mlflow/runs/set-tag", json=tag, auth=ada, timeout=60)
        assert wrote.status_code == 403
        # the team's jobs' user, and the next login replaces ada's password
        teams = json.loads((state / "mlflow" / "teams.json").read_text())
        assert mlflow_get(uri, "runs/get", ("team-vision", teams["vision"]), **run) == 200
        call(url, tokens["ada"], "POST", "/api/me/mlflow")
        assert mlflow_get(uri, "runs/get", ada, **run) == 401

        # no password in the files corral shows or copies; the secrets are private
        kept = json.loads((state / "mlflow" / "secrets.json").read_text())
        admin_password = kept["admin_password"]
        for path in ("secrets.json", "teams.json", "basic_auth.ini"):
            assert (state / "mlflow" / path).stat().st_mode & 0o777 == 0o600
        shown = [
            (folder / SPEC).read_text(),
            (folder / LOG).read_text(),
            "\n".join(logs),
            (state / "mlflow" / "log").read_text(),
        ]
        for text in shown:
            assert admin_password not in text
            assert teams["vision"] not in text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    output = "".join(server.output)
    assert admin_password not in output and teams["vision"] not in output
    assert f"MLflow on {uri}" in output
    wait_until(lambda: not members(group), 30, "MLflow's processes to end")
    with socket.socket() as probe:  # and nothing listens on its port (TIME_WAITs may stay)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_mlflow_ends_with_a_killed_server(tmp_path, mlflow_command):
    port = free_port()
    server, _, _ = start_server(tmp_path, "--cpus", "1", "--mlflow-port", str(port))
    group = mlflow_group(tmp_path / "state")
    assert len(members(group)) >= 3  # the guard, MLflow's CLI and its uvicorn
    server.kill()  # no clean-up of its own runs: the kernel tells the guard
    server.wait(30)
    wait_until(lambda: not members(group), 60, "MLflow's processes to end")


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "corral", "server", "--port", "0"]
        command += ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--state-dir", str(tmp_path)]
        command += ["--isolation", "none", "--mlflow-port", str(port)]
        done = subprocess.run(
            [*command, "--mlflow-command", "/bin/false"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"--mlflow-port {port}: in use" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_an_mlflow_that_ends_as_it_starts_is_one_line(tmp_path):
    with pytest.raises(CorralError, match=r"MLflow ended as it started \(exit code 1\)"):
        mlflow_server.start(free_port(), tmp_path, "/bin/false")


def test_mlflow_port_and_uri_are_exclusive():
    ran = CliRunner().invoke(
        app, ["server", "--mlflow-port", "5000", "--mlflow-uri", "http://127.0.0.1:5000"]
    )
    assert ran.exit_code == 1
    assert "--mlflow-port starts an MLflow server: leave out --mlflow-uri" in ran.output
