"""The embedded default engine: every process of a plan is a local subprocess.

Guarantees, each checked by tests with real processes:

* each process runs in its own process group, so stopping it also stops anything it
  forked (DataLoader workers, shells), and a Ctrl-C at the terminal reaches only the
  caller, which then stops the group in order;
* no orphans even if the caller is killed with SIGKILL: every child holds the read end of a
  pipe whose only write end lives in the caller; when the caller dies the pipe closes and
  the child's watchdog kills its own process group (see `corral.engines.watchdog`);
* every line a process prints is forwarded to the caller's stderr (or another sink: a
  Spark task sends them on to the driver) prefixed with ``[worker 3]``, and kept in
  memory for `WorkerGroup.logs`;
* where a fork server is installed (`corral.engines.forkserver`: a service job installs
  one), a worker starts as its fork, torch already imported, with the same guarantees.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

from corral.engines import forkserver
from corral.engines.base import Engine, Exit, Plan, ProcessSpec, WorkerGroup
from corral.engines.forkserver import ForkedProcess
from corral.errors import LaunchError
from corral.runtime import env as names
from corral.runtime.resources import Resources

#: How many lines of each process's output are kept for `logs()` and error reports.
LOG_LINES_KEPT = 2000

#: Where forwarded output lines go: one prefixed line, without its newline, per call.
LogSink = Callable[[str], None]


def to_stderr(line: str) -> None:
    """The default `LogSink`: the caller's stderr."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # caller's stderr closed: keep collecting
        pass


#: Longest wait, after a process ended, for the rest of its output to be read.
_DRAIN_S = 2.0
#: Environment variable naming the inherited file descriptor of the parent-death pipe.
PARENT_FD_ENV = "CORRAL_PARENT_FD"


def available_gpus() -> list[str]:
    """The GPUs the caller may hand out, as a child's ``CUDA_VISIBLE_DEVICES`` names them,
    found without initialising CUDA in the caller: the caller's own visible devices
    (indices or UUIDs) when it has some, else every GPU ``nvidia-smi`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpus))]


def _total_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def check_resources(processes: list[ProcessSpec]) -> list[list[str]]:
    """Refuse a plan this machine cannot hold; returns the GPUs for each process.

    CPUs may be oversubscribed (the OS time-shares them and tests rely on it), but GPUs
    are handed out exclusively and memory asked for must exist.
    """
    wanted_gpus = sum(p.resources.gpus for p in processes)
    have = available_gpus() if wanted_gpus else []
    if wanted_gpus > len(have):
        raise LaunchError(
            f"the job asks for {wanted_gpus} GPU(s) in all but this machine has {len(have)}"
        )
    wanted_mb = sum(p.resources.memory_mib for p in processes)
    if wanted_mb > _total_memory_mb():
        raise LaunchError(
            f"the job asks for {wanted_mb} MiB of memory in all but this machine has "
            f"{_total_memory_mb()} MiB"
        )
    assignment, next_gpu = [], 0
    for p in processes:
        assignment.append(have[next_gpu : next_gpu + p.resources.gpus])
        next_gpu += p.resources.gpus
    return assignment


def _resource_env(resources: Resources, gpus: list[str], visible: list[str]) -> dict[str, str]:
    """Pin thread pools to the CPUs asked for; show the process `visible` GPUs, its own
    `gpus` among them (see `device_sets`)."""
    threads = str(max(1, math.ceil(resources.cpus)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CORRAL_CPUS": threads}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
    env[names.DEVICE] = str(visible.index(gpus[0]) if gpus else 0)
    return env


def device_sets(processes: list[ProcessSpec], gpus: list[list[str]]) -> list[list[str]]:
    """The GPUs each process sees: all of its role's on this host, in rank order.

    torchrun shows every process the host's GPUs and user code picks its own with
    ``torch.cuda.set_device(LOCAL_RANK)``; showing each only its own would make that fail
    on every rank but 0. Processes without GPUs see none.
    """
    by_role: dict[str, list[str]] = {}
    for spec, own in sorted(zip(processes, gpus, strict=True), key=lambda p: p[0].rank):
        by_role.setdefault(spec.role, []).extend(own)
    return [by_role[spec.role] if own else [] for spec, own in zip(processes, gpus, strict=True)]


class _LocalProcess:
    """One child process and the thread that forwards its output."""

    def __init__(
        self, spec: ProcessSpec, popen: subprocess.Popen[bytes] | ForkedProcess, sink: LogSink
    ) -> None:
        self.spec, self.sink = spec, sink
        self.popen = popen
        self.lines: deque[str] = deque(maxlen=LOG_LINES_KEPT)
        self.drained = False
        assert popen.stdout is not None
        self.reader = threading.Thread(
            target=self._forward, args=(popen.stdout,), name=f"log-{spec.label}", daemon=True
        )
        self.reader.start()

    def returncode(self) -> int | None:
        """The exit code once the process has ended *and* its output is read: an exit
        reported before the last lines are in would give a log tail without them."""
        code = self.popen.poll()
        if code is not None and not self.drained:
            # once only: a grandchild that keeps the pipe open must not hold it back long
            self.reader.join(timeout=_DRAIN_S)
            self.drained = True
        return code

    def _forward(self, stream: IO[bytes]) -> None:
        prefix = f"[{self.spec.label}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self.sink(prefix + line)
        stream.close()

    def kill_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


class LocalWorkerGroup(WorkerGroup):
    """The processes of one plan on this machine."""

    can_add = True

    def __init__(self, parent_pipe: tuple[int, int], sink: LogSink = to_stderr) -> None:
        self._sink = sink
        self._procs: list[_LocalProcess] = []
        self._gpus: list[list[str]] = []
        self._parent_pipe_r, self._parent_pipe_w = parent_pipe

    def start(self, spec: ProcessSpec, gpus: list[str], visible: list[str] | None = None) -> None:
        """Start `spec` on the given GPUs, seeing `visible` ones (default: only its own);
        it inherits the read end of the parent-death pipe."""
        seen = gpus if visible is None else visible
        env = {**os.environ, **_resource_env(spec.resources, gpus, seen), **spec.env}
        env[PARENT_FD_ENV] = str(self._parent_pipe_r)
        popen: subprocess.Popen[bytes] | ForkedProcess | None = self._forked(spec, env)
        try:
            popen = popen or subprocess.Popen(
                spec.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(self._parent_pipe_r,),
            )
        except OSError as exc:
            raise LaunchError(f"cannot start {spec.label}: {exc}") from exc
        self._procs.append(_LocalProcess(spec, popen, self._sink))
        self._gpus.append(gpus)

    def _forked(self, spec: ProcessSpec, env: dict[str, str]) -> ForkedProcess | None:
        """`spec` forked by the installed fork server (`corral.engines.forkserver`), its
        output to a pipe as an exec'd one's; None if there is none or it cannot."""
        server = forkserver.installed()
        if server is None or not server.can_run(spec.argv, env):
            return None
        read, write = os.pipe()
        pipe = os.fdopen(read, "rb")
        try:
            popen = forkserver.start(
                spec.argv, env, stdout=write, pass_fds=(self._parent_pipe_r,), pipe=pipe
            )
        finally:
            os.close(write)
        if popen is None:
            pipe.close()
        return popen

    def add(self, spec: ProcessSpec) -> None:
        running = [p.spec for p in self._procs if p.popen.poll() is None]
        check_resources([*running, spec])
        busy = {
            g
            for p, gs in zip(self._procs, self._gpus, strict=True)
            if p.popen.poll() is None
            for g in gs
        }
        free = [g for g in (available_gpus() if spec.resources.gpus else []) if g not in busy]
        self.start(spec, free[: spec.resources.gpus])

    def poll(self) -> list[Exit]:
        exits = []
        for p in self._procs:
            code = p.returncode()
            if code is not None:
                exits.append(Exit(role=p.spec.role, rank=p.spec.rank, returncode=code))
        return exits

    def wait(self, timeout: float | None = None) -> list[Exit]:
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self._procs:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                p.popen.wait(remaining)
            except subprocess.TimeoutExpired:
                break
        return self.poll()

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after `grace` seconds."""
        for p in self._procs:
            if p.popen.poll() is None:
                p.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            # Even a process that exited may have left children in its group.
            p.kill_group(signal.SIGKILL)
            p.popen.wait()
            p.reader.join(timeout=1.0)
        for fd in (self._parent_pipe_r, self._parent_pipe_w):
            if fd >= 0:
                os.close(fd)
        self._parent_pipe_r = self._parent_pipe_w = -1

    def logs(self, role: str, rank: int) -> str:
        for p in self._procs:
            if p.spec.role == role and p.spec.rank == rank:
                return "\n".join(p.lines)
        raise KeyError(f"no process {role} {rank} in this group")


class LocalEngine(Engine):
    """Runs each process of a plan as a subprocess of the caller, in its own process group.

    Args:
        sink: where the processes' prefixed output lines go; the caller's stderr by default.
    """

    def __init__(self, sink: LogSink = to_stderr) -> None:
        self.sink = sink

    def launch(self, plan: Plan) -> LocalWorkerGroup:
        if plan.feed is not None:
            raise LaunchError("the local engine cannot read a Spark DataFrame: use engine='spark'")
        gpus = check_resources(plan.processes)
        visible = device_sets(plan.processes, gpus)
        group = LocalWorkerGroup(os.pipe(), self.sink)
        try:
            for spec, devices, seen in zip(plan.processes, gpus, visible, strict=True):
                group.start(spec, devices, seen)
        except BaseException:
            group.stop(grace=0)
            raise
        return group
