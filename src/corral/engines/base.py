"""The contract every engine implements: run a plan of processes, report how they end.

An engine knows nothing of training or strategies. It is handed a `Plan` — a list of
processes, each with a role, a rank, a command line, an environment and resources — and
returns a `WorkerGroup` that can be polled, waited on, stopped and asked for logs. The
training layer decides what to run; the engine decides only where and how.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from corral.errors import LaunchError
from corral.runtime.resources import ONE_CPU, Resources


@dataclass(frozen=True, kw_only=True)
class ProcessSpec:
    """One process of a plan: who it is and exactly what to execute."""

    role: str
    rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Engines enforce what they can and refuse what they lack.
    resources: Resources = ONE_CPU
    #: Files of the caller's machine the process reads, named in `argv` by these paths.
    #: An engine that runs it on another machine ships them and rewrites those paths.
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Short name used to prefix log lines, e.g. ``worker 3``."""
        return f"{self.role} {self.rank}"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The processes of one attempt of a job; all start together and stop together."""

    processes: list[ProcessSpec]
    #: Data only some engines can deliver to the workers: for the Spark engine, a
    #: DataFrame whose partitions, one per worker, each worker's task reads.
    feed: Any = None


@dataclass(frozen=True, kw_only=True)
class Exit:
    """How one process ended: an exit code, or the signal that killed it."""

    role: str
    rank: int
    returncode: int

    @property
    def signal_name(self) -> str | None:
        """``SIGKILL`` and the like when a signal ended the process, else ``None``."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def how(self) -> str:
        """How it ended, for error messages: ``was killed by SIGKILL``."""
        if self.signal_name:
            return f"was killed by {self.signal_name}"
        return f"exited with code {self.returncode}"


class WorkerGroup(ABC):
    """A running plan. All methods are safe to call from the thread that launched it."""

    #: Whether `add` can start a process in the running group (a Spark barrier stage cannot).
    can_add: bool = False

    def add(self, spec: ProcessSpec) -> None:
        """Start one more process beside the running ones (a worker joining the job)."""
        raise LaunchError(f"this engine cannot add {spec.label} to a running job")

    @abstractmethod
    def poll(self) -> list[Exit]:
        """The exits seen so far, without blocking."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Exit]:
        """Block until every process has ended (or `timeout` passes); returns the exits."""

    @abstractmethod
    def stop(self, grace: float = 1.0) -> None:
        """Stop every process and everything it started; returns once they are gone."""

    @abstractmethod
    def logs(self, role: str, rank: int) -> str:
        """Everything the process wrote to stdout and stderr so far."""


class Engine(ABC):
    """Somewhere to run plans: local processes, a Spark barrier stage, …"""

    @property
    def host(self) -> str:
        """The caller's address as this engine's processes reach it: where the launcher
        serves the rendezvous store and the control channel."""
        return "127.0.0.1"

    @abstractmethod
    def launch(self, plan: Plan) -> WorkerGroup:
        """Start every process of `plan`; raises `LaunchError` if any cannot start."""
