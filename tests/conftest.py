"""Shared helpers for tests that start real worker processes."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
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


# -- the job service's stores: a SQLite file, and a fresh schema on the PostgreSQL server of
# the project's machines (skipped, with the reason, where none answers)
PG_URL = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_schema() -> tuple[str, str]:
    """A new, empty schema on the test server: its name, and a URL that uses it."""
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3, autocommit=True) as conn:
            name = f"corral_{secrets.token_hex(4)}"
            conn.execute(f"CREATE SCHEMA {name}")
    except Exception as exc:
        pytest.skip(f"no PostgreSQL at {PG_URL}: {type(exc).__name__}: {str(exc)[:80]}")
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
