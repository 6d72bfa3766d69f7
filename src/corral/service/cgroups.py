"""Memory and CPU limits of one job attempt, enforced by the kernel's control groups.

The scheduler grants a job memory and CPUs; here they become a cgroup's limits, so a job
that allocates past its grant is stopped by the kernel (an OOM kill inside its group,
its neighbours untouched) and one that spins on every core gets only its share.

Each attempt gets a group below the server's own (so jobs stay inside whatever limits
the server runs under), on cgroup v2 (``memory.max``, ``cpu.max``, OOM kills counted in
``memory.events``) or v1 (``memory.limit_in_bytes``, ``cpu.cfs_quota_us``,
``memory.oom_control``). The job's process joins it before it drops to the team's account
(`corral.service.sandbox`), so everything it starts is inside. Where neither can be used
`create` returns None and the sandbox falls back to ``RLIMIT_AS``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
#: The CPU-quota period (the kernel's default).
_PERIOD_US = 100_000


def _own(controller: str | None) -> str | None:
    """The server's own group path for a v1 `controller`, or v2's (None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            return path
    return None


@dataclass(frozen=True)
class Cgroup:
    """The groups of one attempt: `procs` are the files its process writes its pid to."""

    dirs: tuple[Path, ...]
    version: int
    memory_mib: int

    @property
    def procs(self) -> tuple[Path, ...]:
        return tuple(d / "cgroup.procs" for d in self.dirs)

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this group for exceeding its memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.dirs[0] / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the groups once their processes are gone (a group with one is kept)."""
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _v2(name: str, memory_mib: int, cpus: float) -> Cgroup | None:
    own = _own(None)
    if own is None or not (ROOT / "cgroup.controllers").exists():
        return None
    if not {"memory", "cpu"} <= set((ROOT / "cgroup.controllers").read_text().split()):
        return None
    base = ROOT / own.lstrip("/") / "corral"
    try:
        base.mkdir(exist_ok=True)
        _write(base.parent / "cgroup.subtree_control", "+memory +cpu")
    except OSError:
        # v2 lets only a group without processes hand controllers down: move the server
        # into a leaf of its own first, as a delegated service manager does
        try:
            leaf = base.parent / "corral-server"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(base.parent / "cgroup.subtree_control", "+memory +cpu")
        except OSError:
            return None
    try:
        _write(base / "cgroup.subtree_control", "+memory +cpu")
        group = base / name
        group.mkdir(exist_ok=True)
        _write(group / "memory.max", str(memory_mib * 2**20) if memory_mib else "max")
        if memory_mib and (group / "memory.swap.max").exists():  # swap: past its grant
            _write(group / "memory.swap.max", "0")
        _write(group / "cpu.max", f"{max(1000, int(cpus * _PERIOD_US))} {_PERIOD_US}")
    except OSError:
        return None
    return Cgroup((group,), 2, memory_mib)


def _v1(name: str, memory_mib: int, cpus: float) -> Cgroup | None:
    dirs = []
    try:
        for controller in ("memory", "cpu"):
            own = _own(controller)
            if own is None or not (ROOT / controller).is_dir():
                return None
            group = ROOT / controller / own.lstrip("/") / "corral" / name
            group.mkdir(parents=True, exist_ok=True)
            dirs.append(group)
        memory, cpu = dirs
        _write(memory / "memory.limit_in_bytes", str(memory_mib * 2**20 if memory_mib else -1))
        swap = memory / "memory.memsw.limit_in_bytes"
        if memory_mib and swap.exists():
            with contextlib.suppress(OSError):
                _write(swap, str(memory_mib * 2**20))
        _write(cpu / "cpu.cfs_period_us", str(_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(max(1000, int(cpus * _PERIOD_US))))
    except OSError:
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
        return None
    return Cgroup(tuple(dirs), 1, memory_mib)


def create(name: str, *, memory_mib: int, cpus: float) -> Cgroup | None:
    """The groups of one attempt with these limits, or None where cgroups cannot be used
    (not root, no memory controller, or no delegation). A `memory_mib` of 0 (the job
    stated none) limits only the CPUs."""
    if os.geteuid() != 0:
        return None
    return _v2(name, memory_mib, cpus) or _v1(name, memory_mib, cpus)


def of_process(pid: int, memory_mib: int) -> Cgroup | None:
    """The attempt's groups that process `pid` is in, if `create` made them: a server
    that restarted finds the limits of the jobs it re-attaches to."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    found: dict[str, Path] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "/corral/" not in path:
            continue
        if controllers == "":
            return Cgroup((ROOT / path.lstrip("/"),), 2, memory_mib)
        for controller in ("memory", "cpu"):
            if controller in controllers.split(","):
                found[controller] = ROOT / controller / path.lstrip("/")
    if "memory" not in found:
        return None
    return Cgroup(tuple(found[c] for c in ("memory", "cpu") if c in found), 1, memory_mib)
