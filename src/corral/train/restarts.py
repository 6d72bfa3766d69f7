"""What to do when a worker group fails: a pure policy, decided apart from execution.

The launcher describes the failure as a `Failure`, asks `decide`, and carries out the
returned `Restart` or `GiveUp`. For a strategy that can train on without a lost worker
(asynchronous parameter-server modes), it first asks `decide_loss`, which may instead
`Replace` that one worker or `Continue` without it. Keeping the decisions functions of
plain data lets tests check every branch without processes (as Ray Train's
``FailurePolicy.make_decision``).
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


@dataclass(frozen=True)
class Replace:
    """Start one new worker that joins the running job; the others never stop."""

    restarts_done: int


@dataclass(frozen=True)
class Continue:
    """Train on with the survivors; `reason` says why no replacement was started."""

    reason: str


def decide_loss(
    failure: Failure, *, survivors: int, restarts_done: int, max_restarts: int, can_add: bool
) -> Replace | Continue | None:
    """For a job that tolerates losing workers: replace one, go on without it, or neither.

    ``None`` means the loss cannot be absorbed (a deterministic error would strike the
    survivors too, or nobody is left to train) and the attempt fails as a whole.
    Replacements count against `max_restarts`, like whole-group restarts.
    """
    if failure.role != "worker" or failure.deterministic or survivors == 0:
        return None
    if not can_add:
        return Continue("this engine cannot add a worker to a running job")
    if restarts_done >= max_restarts:
        return Continue(f"no restarts left (max_restarts={max_restarts})")
    return Replace(restarts_done=restarts_done + 1)
