"""Jobs run as their team's OS account, inside enforced limits: a real ``corral server
--isolation accounts`` (as root), two teams with their own accounts, and a team-beta job
that tries to reach team alpha's running job and the service's own state.

Every probe must fail with EACCES or EPERM while alpha's job goes on and finishes; a job
that allocates past its memory grant is stopped with that reason while alpha's completes.
The accounts the service creates are removed afterwards. Needs root (CI runs as root):
elsewhere it skips, and in CI a non-root run fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import start_server, wait_until

import corral
from corral.service import accounts, cgroups
from corral.service.store import Store

pytestmark = pytest.mark.slow

if os.geteuid() != 0:
    if os.environ.get("CI"):
        pytest.fail("the isolation tests need root in CI", pytrace=False)
    pytest.skip("the isolation tests need root (team accounts)", allow_module_level=True)


@pytest.fixture(autouse=True)
def python_for_accounts():
    """The interpreter and corral must be where the job accounts can run them. Where they
    sit under a private home (pyenv in /root, 0700), let others traverse that home (not
    list it) for the test's length, as a production install would put them elsewhere."""
    changed = []
    needed = (os.path.realpath(sys.executable), os.path.realpath(corral.__file__))
    for parent in {p for path in needed for p in Path(path).parents}:
        mode = parent.stat().st_mode & 0o777
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
            changed.append((parent, mode))
    yield
    for parent, mode in changed:
        parent.chmod(mode)


@pytest.fixture
def shared():
    """A folder every account may read, for the jobs' code and data (pytest's own
    temporary folders are root's, 0700), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="corral-iso-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def teams():
    """Two fresh team names; their accounts are deleted afterwards."""
    names = [f"alpha{secrets.token_hex(2)}", f"beta{secrets.token_hex(2)}"]
    yield names
    for name in names:
        accounts.remove(name)


def write_job(folder: Path, name: str, body: str, **spec) -> dict:
    """A job whose model factory runs `body` first, with its data, readable by all."""
    import numpy as np
    import pandas as pd

    folder = folder / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    frame = pd.DataFrame({"a": rng.normal(size=64) + 3 * y, "b": rng.normal(size=64), "y": y})
    frame.to_parquet(folder / "train.parquet")
    code = textwrap.dedent("""
        import errno, os, signal, time
        import torch

        def make():
        {body}
            return torch.nn.Linear(2, 2)
    """).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    (folder / "model.py").write_text(code)
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {
        "name": name,
        "entrypoint": f"{folder / 'model.py'}:make",
        "data": {"path": str(folder / "train.parquet"), "features": ["a", "b"], "label": "y"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "batch_size": 16,
        "epochs": 1,
        **spec,
    }


class Service:
    """A running ``corral server --isolation accounts`` and its teams' tokens."""

    def __init__(self, tmp: Path, teams: list[str]) -> None:
        self.db = tmp / "db.sqlite"
        self.state = tmp / "state"
        self.proc, self.url, admin = start_server(
            tmp,
            *("--db", f"sqlite:///{self.db}", "--state-dir", str(self.state)),
            *("--cpus", "4", "--isolation", "accounts"),
        )
        assert admin is not None
        self.tokens: dict[str, str] = {}
        for team in teams:
            self.post("/api/admin/teams", admin, {"name": team})
            made = self.post("/api/admin/users", admin, {"name": f"u-{team}", "team": team})
            self.tokens[team] = made["token"]

    def post(self, path: str, token: str, body: dict) -> dict:
        reply = httpx.post(
            f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        output = "".join(self.proc.output[-20:])  # type: ignore[attr-defined]
        assert reply.status_code in (200, 201), f"{reply.text}\n{output}"
        return reply.json()

    def submit(self, team: str, spec: dict) -> str:
        return self.post("/api/jobs", self.tokens[team], {"spec": spec})["id"]

    def job(self, team: str, job_id: str) -> dict:
        auth = {"Authorization": f"Bearer {self.tokens[team]}"}
        return httpx.get(f"{self.url}/api/jobs/{job_id}", headers=auth, timeout=30).json()

    def log(self, team: str, job_id: str) -> str:
        auth = {"Authorization": f"Bearer {self.tokens[team]}"}
        reply = httpx.get(f"{self.url}/api/jobs/{job_id}/logs", headers=auth, timeout=30)
        return "\n".join(reply.json()["lines"])

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture
def service(tmp_path, shared, teams):
    tmp = shared / "service"  # the database's folder is readable: only its mode protects it
    tmp.mkdir(mode=0o755)
    service = Service(tmp, teams)
    yield service
    service.close()


def alpha_waiting(shared: Path, gate: Path) -> dict:
    """Team alpha's job: its worker writes a file into the job's folder (its working
    directory, as checkpoints go there) and waits for `gate`, its launcher's payload (with
    the job's keys) on disk meanwhile."""
    body = f"""
        if "RANK" in os.environ:  # in the worker, not the job's own check of the factory
            open("secret.pt", "w").write("alpha's weights")
            print("alpha uid", os.getuid(), "groups", os.getgroups(), flush=True)
            print("alpha env", sorted(os.environ), flush=True)
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.05)
    """
    return write_job(shared, "alpha", body)


def cpu_quota(pid: int) -> float | None:
    """The CPUs the kernel lets process `pid` use, from its cgroup (v2 or v1)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/cpu.max").exists():
            quota, period = Path(f"/sys/fs/cgroup{path}/cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        if "cpu" in controllers.split(","):
            group = Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
            quota = int((group / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else quota / int((group / "cpu.cfs_period_us").read_text())
    return None


def payload_of(uid: int) -> Path:
    """The launcher payload (the job's keys inside) of the running job of account `uid`."""
    (found,) = [p for p in Path("/tmp").glob("corral-*/payload.pkl") if p.stat().st_uid == uid]
    return found


def test_a_team_cannot_reach_another_teams_job_or_the_services_state(service, shared, teams):
    alpha, beta = teams
    gate = shared / "go"
    a = service.submit(alpha, alpha_waiting(shared, gate))
    folder = service.state / "jobs" / a
    wait_until(
        lambda: (folder / "secret.pt").exists() or service.job(alpha, a)["state"] == "failed",
        120,
        "alpha's job to write its file",
    )
    assert (folder / "secret.pt").exists(), (service.job(alpha, a), service.log(alpha, a))
    account = accounts.ensure(alpha)
    store = Store(f"sqlite:///{service.db}")  # the API shows no pid: the store does
    pid = store.job(a).pid
    store.close()
    targets = {
        "read alpha's file": f"open({str(folder / 'secret.pt')!r}).read()",
        "read alpha's log": f"open({str(folder / 'log')!r}).read()",
        "list alpha's folder": f"os.listdir({str(folder)!r})",
        "read the database": f"open({str(service.db)!r}, 'rb').read(1)",
        "write the database": f"open({str(service.db)!r}, 'r+b').write(b'x')",
        "read alpha's job keys": f"open({str(payload_of(account.uid))!r}, 'rb').read()",
        "signal alpha's job": f"os.kill({pid}, signal.SIGTERM)",
        "read the server's environ": f"open('/proc/{service.proc.pid}/environ').read()",
    }
    probes = "\n".join(
        f"""
try:
    {code}
    print("probe {name}: ALLOWED", flush=True)
except OSError as exc:
    print("probe {name}:", errno.errorcode[exc.errno], flush=True)"""
        for name, code in targets.items()
    )
    assert cpu_quota(pid) == 1.0  # the grant: one worker of one CPU
    b = service.submit(beta, write_job(shared, "beta", textwrap.dedent(probes)))
    wait_until(lambda: service.job(beta, b)["state"] in ("succeeded", "failed"), 120, "beta")
    log = service.log(beta, b)
    assert service.job(beta, b)["state"] == "succeeded", log
    for name in targets:
        assert f"probe {name}: EACCES" in log or f"probe {name}: EPERM" in log, log
    assert service.job(alpha, a)["state"] == "running"  # untouched by all that
    gate.touch()
    wait_until(lambda: service.job(alpha, a)["state"] != "running", 120, "alpha to finish")
    assert service.job(alpha, a)["state"] == "succeeded"
    alpha_log = service.log(alpha, a)
    assert f"alpha uid {account.uid} groups []" in alpha_log
    env = next(line for line in alpha_log.splitlines() if "alpha env" in line)
    assert "CORRAL_DB" not in env and "HOME" in env
    assert oct(folder.stat().st_mode & 0o777) == "0o700" and folder.stat().st_uid == account.uid
    assert oct(service.db.stat().st_mode & 0o777) == "0o600"


def test_a_job_past_its_memory_grant_is_stopped_while_its_neighbour_finishes(
    service, shared, teams
):
    alpha, beta = teams
    gate = shared / "go"
    a = service.submit(alpha, alpha_waiting(shared, gate))
    hog = """
        chunks = []
        for _ in range(64):  # 8 GiB in all, far past the grant
            chunks.append(bytearray(128 * 2**20))
    """
    spec = write_job(shared, "hog", hog, roles={"worker": {"memory": "1g"}})
    b = service.submit(beta, spec)
    wait_until(lambda: service.job(beta, b)["state"] == "failed", 60, "the hog to be stopped")
    probe = cgroups.create(f"probe-{secrets.token_hex(3)}", memory_mib=64, cpus=1)
    if probe is not None:  # the kernel stopped it, and the runner says why
        probe.remove()
        assert service.job(beta, b)["reason"] == "stopped: exceeded its 1 GiB memory"
    else:  # no cgroups here: RLIMIT_AS refused the allocation
        assert "MemoryError" in service.job(beta, b)["reason"]
    assert service.job(alpha, a)["state"] == "running"
    gate.touch()
    wait_until(lambda: service.job(alpha, a)["state"] != "running", 120, "alpha to finish")
    assert service.job(alpha, a)["state"] == "succeeded"
