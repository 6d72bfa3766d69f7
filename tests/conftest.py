"""Shared helpers for tests that start real worker processes."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pytest

from corral.service.store import Store


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it runs no code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_until(condition, timeout: float, what: str) -> float:
    """Poll `condition` until true; returns seconds taken, fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def read_pids(folder: Path) -> list[int]:
    """Pids that worker functions recorded as files named after them in `folder`."""
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


def record_pid(folder: str) -> None:
    """Called inside a worker: leave a file named after this process's pid."""
    Path(folder, str(os.getpid())).touch()


@pytest.fixture
def pid_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pids"
    d.mkdir()
    return d


def blobs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs in 2-D: any working trainer gets them right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 2)).astype(np.float32) + 4 * np.eye(3, 2, dtype=np.float32)[y]
    return x, y


#: Spark settings that keep a test driver on loopback, without a web UI.
LOOPBACK_SPARK_CONF = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
}


class DieOnceLoss:
    """Cross-entropy that SIGKILLs worker 1 once epoch 1's checkpoint exists (first
    attempt only): a restart from the last checkpoint must follow."""

    def __call__(self, out, y):
        import signal

        import torch

        import corral

        ctx = corral.context()
        if (
            ctx.rank == 1
            and ctx.restart_count == 0
            and (ctx.checkpoint_dir / "checkpoint-000001.pt").exists()
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.nn.functional.cross_entropy(out, y)


def server_pid(rank: int) -> int:
    """Inside a job's process: the pid of the job's server `rank`, found by the environment
    the launcher gave it (its role, rank and the job's rendezvous port)."""
    wanted = {"CORRAL_ROLE": "server", "RANK": str(rank), "MASTER_PORT": os.environ["MASTER_PORT"]}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:  # a process may end, or hide its environment, while we look
            raw = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        if all(env.get(k) == v for k, v in wanted.items()):
            return int(proc.name)
    raise LookupError(f"no server {rank} of this job")


def rogue_keys(keys):
    """CURVE keys of a process outside the job `keys` belong to, in the worst case: it knows
    the job's server public key, but holds its own client keypair, not the job's."""
    from corral.comm.curve import JobKeys

    own = JobKeys.generate()
    return JobKeys(keys.server_public, own.server_secret, own.client_public, own.client_secret)


@pytest.fixture(scope="session")
def spark():
    """A real Spark session, local[2], driver on 127.0.0.1; skipped in one line without Java."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java (17) and neither `java` nor JAVA_HOME is set")
    from corral.engines.spark import session as spark_session

    session = spark_session("local[2]", LOOPBACK_SPARK_CONF)
    yield session
    session.stop()


def sequential_sgd(reference, data, *, lr: float, workers: int = 2, batch_size: int = 16):
    """Train `reference` in one process as sync data parallelism should: every step, all
    workers' batches of epoch 0 at once, plain SGD. Returns it."""
    import torch

    from corral.data import as_source

    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    source = as_source(data)
    ranks = [
        list(source.batches(rank=r, world_size=workers, epoch=0, seed=0, batch_size=batch_size))
        for r in range(workers)
    ]
    for step in zip(*ranks, strict=True):
        opt.zero_grad()
        x, y = torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    return reference


# -- services the suite needs from the machine: PostgreSQL and Chromium


def unavailable(reason: str) -> NoReturn:
    """Skip the test on a developer's machine that lacks a service; fail it in CI.

    CI (``CI=true``, as GitHub Actions and most runners set it) promises every service, so
    a skip there would hide a missing one behind a green run.
    """
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the Chromium the web UI's browser tests drive (Debian's ``chromium``)."""
    path = shutil.which("chromium")
    if path is None:
        unavailable("no chromium on PATH (scripts/test installs it)")
    return path


# the job service's stores: a SQLite file, and a fresh schema on the PostgreSQL server of
# the project's machines
PG_URL = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_schema() -> tuple[str, str]:
    """A new, empty schema on the test server: its name, and a URL that uses it."""
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3, autocommit=True) as conn:
            name = f"corral_{secrets.token_hex(4)}"
            conn.execute(f"CREATE SCHEMA {name}")
    except Exception as exc:
        unavailable(f"no PostgreSQL at {PG_URL}: {type(exc).__name__}: {str(exc)[:80]}")
    return name, f"{PG_URL}?options=-csearch_path%3D{name}"


def _drop_schema(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'corral.db'}"
        return
    name, url = _postgres_schema()
    try:
        yield url
    finally:
        _drop_schema(name)


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


# -- a real Spark standalone cluster on 127.0.0.1, shared by the tests that need one


def _start_spark(spark_home: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(spark_home / "bin" / "spark-class"), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _found_in(log: Path, pattern: str) -> re.Match[str] | None:
    return re.search(pattern, log.read_text(errors="replace")) if log.exists() else None


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    """``spark://127.0.0.1:<port>``: a master and a 2-core worker started with pyspark's own
    ``spark-class``, stopped at the end of the session."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java (17) and neither `java` nor JAVA_HOME is set")
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    logs = tmp_path_factory.mktemp("cluster")
    procs = []
    try:
        master_log = logs / "master.log"
        procs.append(
            _start_spark(
                spark_home,
                master_log,
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--webui-port",
                "0",
            )
        )
        wait_until(
            lambda: _found_in(master_log, r"Starting Spark master at spark://"),
            90,
            "the Spark master to start",
        )
        url = _found_in(master_log, r"Starting Spark master at (spark://\S+)").group(1)
        worker_log = logs / "worker.log"
        procs.append(
            _start_spark(
                spark_home,
                worker_log,
                "org.apache.spark.deploy.worker.Worker",
                url,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--webui-port",
                "0",
                "--cores",
                "2",
                "--memory",
                "2g",
                "--work-dir",
                str(logs / "work"),
            )
        )
        wait_until(
            lambda: _found_in(worker_log, r"Successfully registered with master"),
            90,
            "the Spark worker to register",
        )
        yield url
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# -- the job service: a tiny real job, and a real server process


def job_spec(folder: Path, *, epochs: int = 2, gate: Path | None = None, **extra) -> dict:
    """A tiny real training job, its files in a new folder under `folder` (a job still
    reading its data must not see the next job's written over it). With `gate`, every step
    waits until that file exists, so a test decides when the job may finish without
    racing it."""
    folder = folder / f"job-{secrets.token_hex(4)}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    frame = pd.DataFrame({"a": rng.normal(size=200) + 3 * y, "b": rng.normal(size=200), "y": y})
    frame.to_parquet(folder / "train.parquet")
    wait = (
        f"\n                while not os.path.exists({str(gate)!r}):"
        "\n                    time.sleep(0.05)"
        if gate
        else ""
    )
    (folder / "model.py").write_text(
        textwrap.dedent(f"""
        import os, time
        import torch

        class Gated(torch.nn.Module):
            def __init__(self):
                super().__init__()
                layers = [torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)]
                self.net = torch.nn.Sequential(*layers)

            def forward(self, x):{wait}
                return self.net(x)

        def make():
            parent = open(f"/proc/{{os.getppid()}}/cmdline", "rb").read().replace(b"\\0", b" ")
            print("parent:", parent.decode(), flush=True)
            return Gated()

        def broken():
            raise RuntimeError("this model cannot be built")
        """)
    )
    return {
        "name": "tiny",
        "entrypoint": f"{folder / 'model.py'}:make",
        "data": {"path": str(folder / "train.parquet"), "features": ["a", "b"], "label": "y"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "epochs": epochs,
        "batch_size": 32,
        **extra,
    }


def start_server(
    tmp_path: Path, *options: str, cwd: Path | None = None
) -> tuple[subprocess.Popen[str], str, str | None]:
    """A real ``corral server`` on a free port, its state in `tmp_path`: the process, its
    URL, and the admin token it prints on its first start (``None`` on a later start).

    The process also carries ``banner`` (its "corral server on …" line) and ``output``
    (all it printed, still read by a thread, so a full pipe never blocks it).
    """
    command = [sys.executable, "-m", "corral", "server", "--port", "0"]
    command += ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    command += ["--state-dir", str(tmp_path / "state"), *(options or ("--cpus", "4"))]
    if "--isolation" not in options:  # the job files of these tests are root's (CI)
        command += ["--isolation", "none"]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output: list[str] = []
    token = None
    for line in proc.stdout:  # ends at EOF if the server dies
        output.append(line)
        if line.strip().startswith("crl_"):
            token = line.strip()
        if line.startswith("corral server on "):
            proc.banner, proc.output = line, output  # type: ignore[attr-defined]
            threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True).start()
            return proc, line.split()[3], token
    proc.kill()
    pytest.fail("the server did not start:\n" + "".join(output))
