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
    failure: Failure,
    *,
    tolerated: bool,
    survivors: int,
    restarts_done: int,
    max_restarts: int,
    can_add: bool,
) -> Replace | Continue | None:
    """Whether the job absorbs the loss of one process instead of failing the attempt.

    `tolerated` says whether the job can lose this process at all: for workers, whether the
    strategy trains on without one; for helpers (servers), whether their role restarts in
    place. A worker is replaced by a successor with a new rank, or the survivors continue;
    a helper is started again or the attempt fails. ``None`` means the loss cannot be
    absorbed: not tolerated, a deterministic error that would strike again, nobody left
    to train, or a helper with no restart left. Replacements count against
    `max_restarts`, like whole-group restarts.
    """
    if not tolerated or failure.deterministic:
        return None
    replace = can_add and restarts_done < max_restarts
    if failure.role != "worker":
        return Replace(restarts_done=restarts_done + 1) if replace else None
    if survivors == 0:
        return None
    if replace:
        return Replace(restarts_done=restarts_done + 1)
    if not can_add:
        return Continue("this engine cannot add a worker to a running job")
    return Continue(f"no restarts left (max_restarts={max_restarts})")
