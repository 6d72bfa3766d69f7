"""``corral server --api-processes 2``: a real server whose port is served by two processes,
each on its own store. Each alone answers the API; submissions spread over both, retries
racing from both, store every job exactly once; and no API process outlives the server,
whether it is stopped (SIGTERM) or killed (SIGKILL). One that dies early is reported and
the other serves on.

Nothing trains: the pool is 1 CPU, held by a job written as running straight into the
store (as the load bench does), so every job submitted here stays queued and the server
starts no job process: its only children are its API processes (and the runner's fork
server, which the API processes do not hold: it is spawned after they are forked)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from conftest import alive, start_server, wait_until

from corral.runtime.resources import Resources
from corral.service.store import Store, User

pytestmark = pytest.mark.slow


def children_of(pid: int, *, fork_server: bool = False) -> list[int]:
    """The processes whose parent is `pid`, zombies included (read from /proc): its API
    processes, or its runner's fork server (`corral.engines.forkserver`)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and (b"corral.engines.forkserver" in cmdline) == fork_server:
            found.append(int(stat.parent.name))
    return found


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[int] = []
        self.fork_server: list[int] = []
        options = ("--cpus", "1", "--memory", "1g", "--gpus", "0", "--api-processes", "2")
        self.proc, self.url, admin = start_server(tmp_path, *options)
        try:
            self._setup(admin)
        except BaseException:  # a setup that fails leaves no server behind
            self.stop()
            for pid in self.children + self.fork_server:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            raise

    def _setup(self, admin: str | None) -> None:
        tmp_path = self.tmp_path
        assert admin is not None
        self.db = f"sqlite:///{tmp_path / 'db.sqlite'}"
        # the API processes are forked before the server says it is up
        self.children = children_of(self.proc.pid)
        self.fork_server = children_of(self.proc.pid, fork_server=True)
        self.admin = {"Authorization": f"Bearer {admin}"}
        pd.DataFrame({"a": [0.0, 1.0], "y": [0, 1]}).to_parquet(tmp_path / "train.parquet")
        with httpx.Client(base_url=self.url, headers=self.admin, timeout=30) as api:
            for team in ("load", "holder"):
                api.post("/api/admin/teams", json={"name": team}).raise_for_status()
            made = api.post("/api/admin/users", json={"name": "loader", "team": "load"})
            made.raise_for_status()
            holder = api.post("/api/admin/users", json={"name": "holder", "team": "holder"})
            holder.raise_for_status()
            api.put("/api/admin/quotas/holder", json={"cpus": 0}).raise_for_status()
        self.token = {"Authorization": f"Bearer {made.json()['token']}"}
        store = Store(self.db)  # a job that holds the pool: nothing submitted here starts
        try:
            holder, _ = store.add_job(
                user=User("holder", "holder", False),
                name="holder",
                spec=self.spec("holder"),
                demand=Resources(cpus=1, memory_mib=1024, gpus=0),
            )
            store.transition(holder.id, ["queued"], "running", "holds the pool", started=1.0)
        finally:
            store.close()

    def spec(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "entrypoint": "examples.digits:make_model",
            "data": {"path": str(self.tmp_path / "train.parquet"), "label": "y"},
            "roles": {"worker": {"count": 1, "cpus": 1, "memory": "512m"}},
        }

    def submit(self, api: httpx.Client, key: str) -> str:
        reply = api.post("/api/jobs", json={"spec": self.spec(key), "client_key": key})
        assert reply.status_code == 201, reply.text
        return str(reply.json()["id"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    made = Server(tmp_path)
    try:
        yield made
    finally:
        made.stop()
        for pid in made.children + made.fork_server:  # not on the machine after a failure
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_each_process_alone_serves_the_api(server: Server) -> None:
    assert len(server.children) == 1, server.children
    (child,) = server.children
    # one process stopped, the other takes every new connection from the shared socket
    for stopped in (server.proc.pid, child):
        os.kill(stopped, signal.SIGSTOP)
        try:
            with httpx.Client(base_url=server.url, headers=server.token, timeout=30) as api:
                job_id = server.submit(api, f"alone-{stopped}")
                assert api.get(f"/api/jobs/{job_id}").json()["state"] == "queued"
        finally:
            os.kill(stopped, signal.SIGCONT)


def test_concurrent_submissions_over_both_processes_are_stored_once(server: Server) -> None:
    clients, per_client = 8, 15
    answers: dict[str, set[str]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def racing(key: str) -> list[str]:
        """The same submission from two connections at once (a client that resent it)."""
        twin: list[str] = []
        with httpx.Client(base_url=server.url, headers=server.token, timeout=30) as b:
            other = threading.Thread(target=lambda: twin.append(server.submit(b, key)))
            other.start()
            with httpx.Client(base_url=server.url, headers=server.token, timeout=30) as a:
                first = server.submit(a, key)
            other.join()
        return [first, *twin]

    def client(n: int) -> None:
        try:
            # a fresh connection per submission: the kernel deals them to both processes
            for i in range(per_client):
                key = f"key-{n}-{i}"
                if i % 5 == 0:
                    ids = racing(key)
                else:
                    with httpx.Client(base_url=server.url, headers=server.token, timeout=30) as a:
                        ids = [server.submit(a, key)]
                        if i % 5 == 1:  # a retry after the reply
                            ids.append(server.submit(a, key))
                with lock:
                    answers.setdefault(key, set()).update(ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len(answers) == clients * per_client
    assert all(len(ids) == 1 for ids in answers.values()), "a retry got another job"
    with httpx.Client(base_url=server.url, headers=server.admin, timeout=30) as api:
        listed = api.get("/api/jobs", params={"all_states": "true", "limit": 10_000}).json()
    mine = [j for j in listed if j["user"] == "loader"]
    assert sorted(j["id"] for j in mine) == sorted(next(iter(v)) for v in answers.values())
    store = Store(server.db)
    try:
        assert store.count_jobs() == clients * per_client + 1  # and the holder
        assert all(j.state == "queued" for j in store.jobs(team="load", states=None))
    finally:
        store.close()


def test_no_api_process_outlives_a_stopped_server(server: Server) -> None:
    assert len(server.children) == 1, server.children
    server.stop()
    assert server.proc.returncode == 0, server.proc.returncode
    assert len(server.fork_server) == 1, server.fork_server
    for pid in server.children + server.fork_server:
        wait_until(lambda pid=pid: not alive(pid), 30, f"process {pid} to end")


def test_no_api_process_outlives_a_killed_server(server: Server) -> None:
    assert len(server.children) == 1, server.children
    server.proc.kill()  # no clean-up runs: the API process ends on its own (its parent died)
    server.proc.wait(30)
    assert len(server.fork_server) == 1, server.fork_server
    for pid in server.children + server.fork_server:
        wait_until(lambda pid=pid: not alive(pid), 30, f"process {pid} to end")


def test_an_api_process_that_dies_is_reported_and_the_other_serves_on(server: Server) -> None:
    (child,) = server.children
    os.kill(child, signal.SIGKILL)
    said = f"API process {child} ended (killed by SIGKILL); 1 of 2 serve the API on"
    output: list[str] = server.proc.output  # type: ignore[attr-defined]
    wait_until(lambda: any(said in line for line in output), 30, "the server to report it")
    assert children_of(server.proc.pid) == []  # reaped, not a zombie
    with httpx.Client(base_url=server.url, headers=server.token, timeout=30) as api:
        for n in range(5):  # new connections: all reach the process that is left
            assert server.submit(api, f"after-{n}")
