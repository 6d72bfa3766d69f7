"""What to do when a worker group fails: a pure policy, decided apart from execution.

The launcher describes the failure as a `Failure`, asks `decide`, and carries out the
returned `Restart` or `GiveUp`. Keeping the decision a function of plain data lets tests
check every branch without processes (as Ray Train's ``FailurePolicy.make_decision``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Failure:
    """The root cause of a failed attempt, as seen by the driver."""

    role: str
    rank: int
    exc_type: str | None
    detail: str
    traceback: str = ""
    #: True when the worker raised a corral error (bad data, NaN loss…): rerunning the same
    #: code on the same data would fail the same way, so a restart cannot help.
    deterministic: bool = False


@dataclass(frozen=True)
class Restart:
    """Relaunch the whole group; workers resume from the job's newest checkpoint."""

    attempt: int


@dataclass(frozen=True)
class GiveUp:
    """Fail the job with the failure's error; `reason` says why no restart was tried."""

    reason: str


def decide(failure: Failure, *, restarts_done: int, max_restarts: int) -> Restart | GiveUp:
    """Restart a failed group while restarts remain, unless a restart cannot help."""
    if failure.deterministic:
        return GiveUp("the error does not depend on the process, so a restart cannot fix it")
    if restarts_done >= max_restarts:
        return GiveUp(f"no restarts left (max_restarts={max_restarts})")
    return Restart(attempt=restarts_done + 1)
