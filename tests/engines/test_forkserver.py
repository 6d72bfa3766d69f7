"""The fork server: warm children with what an exec'd process would have, no orphans.

The pytest process runs threads (xdist's), so its servers are spawned; `fork` is tested
in a process of its own, as a service job uses it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corral.engines import forkserver
from corral.engines.forkserver import ForkServer

CHILD = """
import os, sys, time
import numpy

if __name__ == "__main__":
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "x", os.environ.get("FS_X"),
          "leader", os.getsid(0) == os.getpid(), "path0", sys.path[0],
          "rand", numpy.random.randint(1 << 30), flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(120)
    if sys.argv[1] == "fd":
        os.write(int(sys.argv[2]), b"hello")
    sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture
def server(tmp_path, monkeypatch):
    (tmp_path / "fs_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    served = ForkServer.spawn(("fs_child",))
    yield served
    served.close()


def run(server: ForkServer, *args: str, env=None, cwd=None, pass_fds=()):
    read, write = os.pipe()
    pipe = os.fdopen(read, "rb")
    child = forkserver.start(
        [sys.executable, "-m", "fs_child", *args],
        env or dict(os.environ),
        stdout=write,
        cwd=cwd,
        pass_fds=pass_fds,
        pipe=pipe,
        server=server,
    )
    os.close(write)
    return child


def test_a_child_runs_the_module_as_main_with_its_own_argv_env_folder_and_session(server, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    env = dict(os.environ, FS_X="forty-two")
    child = run(server, "exit", "3", env=env, cwd=str(folder))
    assert child is not None and child.pid != server.pid
    assert child.wait(60) == 3
    out = child.stdout.read().decode()
    assert "argv ['exit', '3']" in out
    assert f"cwd {folder}" in out and f"path0 {folder}" in out
    assert "x forty-two" in out and "leader True" in out


def test_children_do_not_share_numpy_random_state(server):
    draws = []
    for _ in range(3):
        child = run(server, "exit", "0")
        assert child.wait(60) == 0
        draws.append(child.stdout.read().decode().split("rand ")[1].split()[0])
    assert len(set(draws)) == 3


def test_a_passed_descriptor_keeps_its_number(server):
    read, write = os.pipe()
    child = run(server, "fd", str(write), "0", pass_fds=(write,))
    os.close(write)
    assert child.wait(60) == 0
    assert os.read(read, 16) == b"hello"
    os.close(read)


def test_a_killed_child_reports_its_signal_and_wait_times_out_before(server):
    child = run(server, "sleep", "0")
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # its own group, as an exec'd one's
    assert child.wait(60) == -signal.SIGKILL


def test_what_it_cannot_run_is_left_to_exec(server):
    assert run(server, "x") is not None
    other = [sys.executable, "-m", "json.tool"]
    assert not server.can_run(other, dict(os.environ))
    assert not server.can_run(["/bin/python", "-m", "fs_child"], dict(os.environ))
    seeded = dict(os.environ, PYTHONHASHSEED="12345")
    if os.environ.get("PYTHONHASHSEED") != "12345":
        assert not server.can_run([sys.executable, "-m", "fs_child"], seeded)


def test_a_dead_server_means_exec_and_its_children_are_still_waited_for(server):
    child = run(server, "sleep", "0")
    os.kill(server.pid, signal.SIGKILL)
    assert run(server, "exit", "0") is None  # the caller would exec it
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(60) == -signal.SIGKILL  # not its code, lost with the server


FORKED = """
import os, sys, time
from corral.engines.forkserver import ForkServer, install, start

server = ForkServer.fork(("fs_child",))
install(server)
out = os.open("child.log", os.O_WRONLY | os.O_CREAT)  # not a pipe: it outlives us
child = start([sys.executable, "-m", "fs_child", "sleep", "0"], dict(os.environ), stdout=out)
print(server.pid, child.pid, os.getpgid(server.pid) != os.getpgid(0), flush=True)
if sys.argv[1] == "close":
    os.killpg(child.pid, 9)
    child.wait()
    server.close()
    print("closed", flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["close", "sigkill"])
def test_a_forked_server_ends_with_its_caller_and_leaves_no_child(tmp_path, how):
    (tmp_path / "fs_child.py").write_text(CHILD)
    (tmp_path / "caller.py").write_text(textwrap.dedent(FORKED))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    caller = subprocess.Popen(
        [sys.executable, str(tmp_path / "caller.py"), how],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        server, child, own_group = caller.stdout.readline().split()
        assert own_group == "True"  # a signal to the caller's group leaves it be
        if how == "close":
            assert caller.stdout.readline().strip() == "closed"
            assert _gone(int(server)) and _gone(int(child))
        else:
            caller.kill()
            caller.wait()
            # the child has no watchdog here: the server kills it after LINGER_S
            assert not _gone(int(child))
            assert _wait_gone([int(server), int(child)], forkserver.LINGER_S + 10)
    finally:
        caller.kill()
        caller.wait()
