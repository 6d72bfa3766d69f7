"""The service's commands against a real ``corral server`` subprocess, with the logins of
three users (an admin, ada of team vision, bob of team nlp) side by side in one credentials
file, each command run as one of them (``corral --profile NAME``). Submitting, following
logs, fetching the model and a refused login run as ``corral`` processes, exactly as a
user types them; the other commands run in this process through typer's runner, to keep
the module well under a minute."""

from __future__ import annotations

import contextlib
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import torch
from conftest import blobs, start_server
from typer.testing import CliRunner

from corral.cli import app
from corral.service.client import (
    CONFIG_ENV,
    Client,
    Credentials,
    ServiceError,
    load_credentials,
    load_logins,
    save_credentials,
)
from corral.service.commands import PROFILE_ENV
from corral.service.job import CHECKPOINTS

pytestmark = pytest.mark.slow


@dataclass
class Server:
    url: str
    admin_token: str
    root: Path


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _as(profile: str | None, args: tuple[str, ...]) -> list[str]:
    return [*(["--profile", profile] if profile else []), *args]


def corral(
    *args: str,
    config: Path,
    as_: str | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> Ran:
    """``corral [--profile AS_] ARGS`` in this process (fast: no interpreter and torch to
    start each time). An exception that escaped the command fails the test, as a stack
    trace would show."""
    result = CliRunner().invoke(
        app, _as(as_, args), input=stdin, env={CONFIG_ENV: str(config), **(env or {})}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def corral_process(*args: str, config: Path, as_: str | None = None) -> Ran:
    """``corral [--profile AS_] ARGS`` as its own process, exactly as a user runs it."""
    environ = {k: v for k, v in os.environ.items() if k != PROFILE_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "corral", *_as(as_, args)],
        env={**environ, CONFIG_ENV: str(config)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def _stop_jobs(state_dir: Path) -> None:
    """Kill the job processes the server started (each leads a process group of its own)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if b"corral.service.job" in cmdline and str(state_dir).encode() in cmdline:
                os.killpg(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("service")
    state = root / "state"
    proc, url, token = start_server(root, "--cpus", "2")
    assert token is not None
    try:
        yield Server(url=url, admin_token=token, root=root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _stop_jobs(state)


@dataclass
class World:
    """What the admin set up: one credentials file holding every user's login, the names
    of their profiles, and the outputs."""

    config: Path
    setup: dict[str, Ran]
    admin: str = "admin"
    ada: str = "ada"
    bob: str = "nlp-bob"  # saved under a name of bob's choosing

    def cli(self, *args: str, as_: str, **kwargs: Any) -> Ran:
        """``corral --profile AS_ ARGS`` in this process, with the world's logins."""
        return corral(*args, config=self.config, as_=as_, **kwargs)

    def process(self, *args: str, as_: str) -> Ran:
        """``corral --profile AS_ ARGS`` as its own process, with the world's logins."""
        return corral_process(*args, config=self.config, as_=as_)


@pytest.fixture(scope="module")
def world(server: Server) -> World:
    config = server.root / "home" / "credentials.json"
    w = World(config=config, setup={})
    out = w.setup
    # each login is saved beside the others and becomes the default: the admin's is the
    # default until ada logs in
    out["login"] = corral("login", server.url, config=config, stdin=server.admin_token + "\n")
    out["team"] = corral("admin", "teams", "add", "vision", config=config)
    out["team2"] = corral("admin", "teams", "add", "nlp", "--json", config=config)
    out["ada"] = corral("admin", "users", "add", "ada", "--team", "vision", config=config)
    out["bob"] = corral("admin", "users", "add", "bob", "--team", "nlp", "--json", config=config)
    out["quota"] = corral(
        "admin", "quota", "set", "vision", "--cpus", "2", "--memory", "4g", config=config
    )
    for name, done in out.items():
        assert done.returncode == 0, f"{name}: {done.stderr}"
    ada_token = re.search(r"shown only this once:\n\s+(crl_\S+)", out["ada"].stdout)
    assert ada_token is not None, out["ada"].stdout
    bob_token = json.loads(out["bob"].stdout)["token"]
    out["ada_login"] = corral("login", server.url, "--token", ada_token[1], config=config)
    out["bob_login"] = corral(
        "login", server.url, "--token", "-", "--profile", w.bob, config=config, stdin=bob_token
    )
    assert out["ada_login"].returncode == 0, out["ada_login"].stderr
    assert out["bob_login"].returncode == 0, out["bob_login"].stderr
    return w


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny job (300 rows, 1 worker, 1 epoch) whose paths are relative to its folder."""
    folder = tmp_path_factory.mktemp("job")
    x, y = blobs(300)
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y}).to_parquet(folder / "train.parquet")
    (folder / "model.py").write_text(
        textwrap.dedent("""
        import torch
        def make():
            layers = [torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)]
            return torch.nn.Sequential(*layers)
        """)
    )
    (folder / "job.yaml").write_text(
        textwrap.dedent("""
        name: tiny
        entrypoint: model.py:make
        data: {path: train.parquet, features: [a, b], label: y}
        optimizer: {name: sgd, lr: 0.1}
        epochs: 1
        batch_size: 32
        """)
    )
    return folder


@pytest.fixture(scope="module")
def submitted(world: World, job_dir: Path) -> tuple[str, Ran]:
    """Ada's tiny job, submitted from another folder: its id, and what submit printed."""
    done = world.process("submit", str(job_dir / "job.yaml"), as_=world.ada)
    assert done.returncode == 0, done.stderr
    found = re.search(r"as job ([0-9a-f]+): (\S+)", done.stdout)
    assert found is not None, done.stdout
    return found[1], done


def test_a_wrong_token_or_no_server_is_one_line(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "creds.json"
    wrong = corral_process("login", server.url, "--token", "crl_" + "x" * 43, config=config)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert f"not logged in or token not valid: corral login {server.url}" in wrong.stderr
    assert not config.exists()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = corral("login", f"127.0.0.1:{port}", "--token", "crl_x", config=config)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert f"cannot reach the corral server at http://127.0.0.1:{port}: is it running?" in (
        down.stderr
    )
    nobody = corral("jobs", config=config)
    assert nobody.returncode == 1 and "not logged in: corral login URL" in nobody.stderr


def test_the_admin_sets_up_teams_users_and_a_quota(server: Server, world: World) -> None:
    setup = world.setup
    assert "as admin (team admin, admin)" in setup["login"].stdout
    assert f"token for {server.url}:" in setup["login"].stderr  # the prompt, unechoed
    assert server.admin_token not in setup["login"].stdout + setup["login"].stderr
    assert json.loads(setup["team2"].stdout) == ["admin", "nlp", "vision"]
    assert "created user 'ada' (team 'vision')" in setup["ada"].stdout
    assert "quota of team vision: 2 CPUs, 4 GiB of memory, no cap on GPUs" in (
        setup["quota"].stdout
    )
    users = world.cli("admin", "users", "--json", as_=world.admin)
    assert {(u["name"], u["team"]) for u in json.loads(users.stdout)} >= {
        ("ada", "vision"),
        ("bob", "nlp"),
    }
    # the logins are saved for their owner only, and never shown
    assert (world.config.stat().st_mode & 0o777) == 0o600
    assert load_credentials(world.config, world.ada).url == server.url
    assert "crl_" not in setup["ada_login"].stdout + setup["ada_login"].stderr
    again = world.cli("admin", "teams", "add", "vision", as_=world.admin)
    assert again.returncode == 1 and "team 'vision' already exists" in again.stderr
    denied = world.cli("admin", "teams", as_=world.ada)
    assert denied.returncode == 1 and "error: only admins may do this" in denied.stderr


def test_two_users_logins_live_side_by_side(server: Server, world: World) -> None:
    """Logging in as ada, then as bob, keeps the admin's login: its token was shown once."""
    logins = load_logins(world.config)
    assert sorted(logins.profiles) == ["ada", "admin", "nlp-bob"]
    assert logins.default == "nlp-bob"  # the last login
    assert logins.profiles["admin"].token == server.admin_token
    assert (logins.profiles["ada"].user, logins.profiles["ada"].team) == ("ada", "vision")
    assert "saved as profile 'nlp-bob', now the default" in world.setup["bob_login"].stderr
    assert "(also saved: ada, admin)" in world.setup["bob_login"].stderr
    assert f"in {world.config}; corral --profile NAME" in world.setup["bob_login"].stderr

    def team(*args: str, env: dict[str, str] | None = None) -> str:
        done = corral(*args, "quota", "--json", config=world.config, env=env)
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["team"])

    # each call runs as the profile --profile or $CORRAL_PROFILE names, else the default
    assert team("--profile", "admin") == "admin"
    assert team(env={PROFILE_ENV: "ada"}) == "vision"
    assert team() == "nlp"
    listed = corral("profiles", config=world.config)
    assert re.search(rf"\*\s+nlp-bob\s+bob\s+nlp\s+{re.escape(server.url)}", listed.stdout)
    assert re.search(r"^\s*ada\s+ada\s+vision\s", listed.stdout, re.M), listed.stdout
    assert "crl_" not in listed.stdout
    unknown = corral("--profile", "carol", "jobs", config=world.config)
    assert unknown.returncode == 1
    assert "no login saved as 'carol' (saved: ada, admin, nlp-bob)" in unknown.stderr


def test_a_login_an_older_corral_saved_reads_as_profile_default(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"url": "http://host:8642", "token": "crl_old"}))
    assert load_credentials(path) == Credentials(url="http://host:8642", token="crl_old")
    save_credentials(Credentials(url="http://host:8642", token="crl_new", user="ada"), path, "ada")
    logins = load_logins(path)
    assert sorted(logins.profiles) == ["ada", "default"] and logins.default == "ada"
    assert load_credentials(path, "default").token == "crl_old"


def test_submit_prints_the_id_and_url(server: Server, submitted) -> None:
    job_id, done = submitted
    assert f"submitted tiny as job {job_id}: {server.url}/jobs/{job_id}" in done.stdout


def test_quota_shows_the_teams_caps(world: World, submitted) -> None:
    table = world.cli("quota", as_=world.ada)
    assert table.returncode == 0, table.stderr
    assert "team vision" in table.stdout and "4 GiB" in table.stdout
    q = json.loads(world.cli("quota", "--json", as_=world.ada).stdout)
    assert q["team"] == "vision"
    assert q["quota"] == {"cpus": 2.0, "memory_mib": 4096, "gpus": None}


def test_a_wrong_field_is_one_line_naming_it(server: Server, world: World, job_dir: Path) -> None:
    bad = job_dir / "bad.yaml"
    bad.write_text((job_dir / "job.yaml").read_text().replace("epochs: 1", "epochz: 1"))
    local = world.cli("submit", str(bad), as_=world.ada)
    assert local.returncode == 1 and "Traceback" not in local.stderr
    assert "epochz: unknown field" in local.stderr  # as corral train says it
    priority = world.cli("submit", str(job_dir / "job.yaml"), "--priority", "5000", as_=world.ada)
    assert priority.returncode == 1 and "Traceback" not in priority.stderr
    assert "error: priority: Input should be less than or equal to 1000" in priority.stderr
    # what the server says of a spec the CLI did not check first: a 422 naming the field
    creds = load_credentials(world.config, world.ada)
    with Client(creds.url, creds.token) as client, pytest.raises(ServiceError) as refused:
        client.submit({"entrypoint": "m:f", "data": {"path": "x", "label": "y"}, "epochs": 0})
    assert "epochs: Input should be greater than or equal to 1" in str(refused.value)


def test_a_retried_submit_is_stored_once(server: Server, world: World, job_dir: Path) -> None:
    """The first answer is lost on the way back: the retry returns the job it made."""
    sent: list[str] = []

    class LoseFirstAnswer(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if request.method == "POST" and not sent:
                response.read()
                sent.append(json.loads(response.content)["id"])
                raise httpx.ReadError("connection reset", request=request)
            return response

    creds = load_credentials(world.config, world.bob)
    data = {"path": str(job_dir / "train.parquet"), "label": "y"}
    spec = {"entrypoint": "m:f", "data": data, "name": "twice"}
    with Client(creds.url, creds.token, transport=LoseFirstAnswer()) as client:
        job = client.submit(spec)
        client.cancel(job.id)
        mine = client.jobs(all_states=True)
    assert sent == [job.id]
    assert [j.id for j in mine if j.name == "twice"] == [job.id]


def test_another_teams_job_is_no_job(world: World, submitted) -> None:
    job_id, _ = submitted
    for command in ("status", "logs", "cancel"):
        done = world.cli(command, job_id, as_=world.bob)
        assert done.returncode == 1, done.stdout
        assert f"error: no job '{job_id}'" in done.stderr


def test_logs_follow_the_job_to_its_end(world: World, submitted) -> None:
    job_id, _ = submitted
    follow = world.process("logs", "-f", job_id, as_=world.ada)
    assert follow.returncode == 0, follow.stderr
    assert "done: " in follow.stdout and '"loss"' in follow.stdout
    pages = [
        json.loads(line)
        for line in world.cli("logs", job_id, "--json", as_=world.ada).stdout.splitlines()
    ]
    assert pages[-1]["final"] is True
    assert [line for p in pages for line in p["lines"]] == follow.stdout.splitlines()


def test_status_jobs_and_cancel_of_an_ended_job(world: World, submitted, job_dir: Path) -> None:
    job_id, _ = submitted
    world.cli("logs", "-f", job_id, as_=world.ada)  # to its end
    status = world.cli("status", job_id, as_=world.ada)
    assert status.returncode == 0, status.stderr
    assert "succeeded: finished" in status.stdout
    timeline = status.stdout[status.stdout.index("timeline") :]
    assert re.search(
        r"queued\s+submitted.*running\s+launched.*succeeded\s+finished", timeline, re.S
    )
    detail = json.loads(world.cli("status", job_id, "--json", as_=world.ada).stdout)
    assert [e["state"] for e in detail["events"]] == ["queued", "running", "succeeded"]
    # the paths were resolved against the job file's folder, for the server
    assert detail["spec"]["entrypoint"] == f"{job_dir.resolve()}/model.py:make"
    assert detail["spec"]["data"]["path"] == str(job_dir.resolve() / "train.parquet")

    listed = world.cli("jobs", "--all-states", as_=world.ada)
    assert re.search(rf"{job_id}\s+tiny\s+ada\s+vision\s+succeeded", listed.stdout), listed.stdout
    active = json.loads(world.cli("jobs", "--json", as_=world.ada).stdout)
    assert job_id not in [j["id"] for j in active]
    ended = json.loads(world.cli("jobs", "--state", "succeeded", "--json", as_=world.ada).stdout)
    assert [j["id"] for j in ended] == [job_id]
    wrong = world.cli("jobs", "--state", "done", as_=world.ada)
    assert wrong.returncode == 1 and "--state: no state 'done'" in wrong.stderr

    cancel = world.cli("cancel", job_id, as_=world.ada)
    assert cancel.returncode == 0, cancel.stderr
    assert "had already ended (succeeded): nothing to cancel" in cancel.stdout
    after = json.loads(world.cli("cancel", job_id, "--json", as_=world.ada).stdout)
    assert after["state"] == "succeeded"


def test_model_downloads_the_final_checkpoint_for_the_team_only(
    server: Server, world: World, submitted, job_dir: Path, tmp_path: Path
) -> None:
    job_id, _ = submitted
    world.cli("logs", "-f", job_id, as_=world.ada)  # to its end
    on_server = server.root / "state" / "jobs" / job_id / CHECKPOINTS / "checkpoint-000001.pt"
    got = world.cli("model", job_id, "-o", str(tmp_path / "model.pt"), as_=world.ada)
    assert got.returncode == 0, got.stderr
    assert f"saved the model of job {job_id} (epoch 1, checkpoint-000001.pt) to {tmp_path}" in (
        got.stdout
    )
    assert not got.stderr  # it ended: this is its final checkpoint
    net = runpy.run_path(str(job_dir / "model.py"))["make"]()
    net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    trained = torch.load(on_server, weights_only=True)["model"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())
    whole = world.cli("model", job_id, "--checkpoint", "-o", str(tmp_path / "c.pt"), as_=world.ada)
    assert whole.returncode == 0, whole.stderr
    assert (tmp_path / "c.pt").read_bytes() == on_server.read_bytes()
    # another team's token: the same 404 as no job, and no file
    theirs = world.cli("model", job_id, "-o", str(tmp_path / "theirs.pt"), as_=world.bob)
    assert theirs.returncode == 1 and f"error: no job '{job_id}'" in theirs.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "model.pt"]
