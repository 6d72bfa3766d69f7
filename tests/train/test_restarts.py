"""The failure policy: pure decisions, and the launcher carrying them out on scripted groups.

The launcher's own tests use fake worker groups whose processes end as a test scripts
them, so which failure is the root cause, how restarts are counted and when the job gives
up are checked without starting a process.
"""

from __future__ import annotations

import signal

import pytest

import corral
from corral.engines.base import Engine, Exit, Plan, WorkerGroup
from corral.errors import WorkerError
from corral.train.restarts import (
    Continue,
    Failure,
    GiveUp,
    Replace,
    Restart,
    decide,
    decide_loss,
)


def failure(deterministic: bool = False) -> Failure:
    return Failure(
        role="worker",
        rank=1,
        exc_type=None,
        detail="was killed by SIGKILL",
        deterministic=deterministic,
    )


def test_restarts_while_some_are_left():
    assert decide(failure(), restarts_done=0, max_restarts=2) == Restart(attempt=1)
    assert decide(failure(), restarts_done=1, max_restarts=2) == Restart(attempt=2)


def test_gives_up_when_none_are_left():
    decision = decide(failure(), restarts_done=2, max_restarts=2)
    assert isinstance(decision, GiveUp) and "max_restarts=2" in decision.reason


def test_never_restarts_a_deterministic_error():
    decision = decide(failure(deterministic=True), restarts_done=0, max_restarts=5)
    assert isinstance(decision, GiveUp)


def absorb(f: Failure, **kw):
    return decide_loss(
        f,
        **(
            {
                "tolerated": True,
                "survivors": 2,
                "restarts_done": 0,
                "max_restarts": 1,
                "can_add": True,
            }
            | kw
        ),
    )


def test_a_lost_worker_is_replaced_while_restarts_remain():
    assert absorb(failure()) == Replace(restarts_done=1)


def test_without_restarts_the_survivors_continue():
    decision = absorb(failure(), restarts_done=1)
    assert isinstance(decision, Continue) and "max_restarts=1" in decision.reason
    decision = absorb(failure(), can_add=False, max_restarts=3)
    assert isinstance(decision, Continue) and "cannot add" in decision.reason


def test_a_loss_is_not_absorbed_when_nobody_is_left_or_it_would_repeat():
    assert absorb(failure(), survivors=0) is None
    assert absorb(failure(deterministic=True)) is None
    assert absorb(failure(), tolerated=False) is None


def test_a_restartable_helper_restarts_while_restarts_remain():
    server = Failure(role="server", rank=0, exc_type=None, detail="was killed by SIGKILL")
    assert absorb(server, survivors=0) == Replace(restarts_done=1)
    assert absorb(server, restarts_done=1) is None
    assert absorb(server, can_add=False) is None
    assert absorb(server, tolerated=False) is None


# -- the launcher carrying out the policy, on scripted worker groups (no processes)


class ScriptedGroup(WorkerGroup):
    """A group whose processes have already ended as scripted; the rest run forever."""

    def __init__(self, exits: list[Exit]) -> None:
        self.exits, self.stopped = exits, False

    def poll(self) -> list[Exit]:
        return list(self.exits)

    def wait(self, timeout: float | None = None) -> list[Exit]:
        return self.poll()

    def stop(self, grace: float = 1.0) -> None:
        self.stopped = True

    def logs(self, role: str, rank: int) -> str:
        return f"last words of {role} {rank}"


class ScriptedEngine(Engine):
    """Launch `n` gets the group of the `n`-th script, ``{rank: returncode}``; keeps each
    plan and group, so a test sees how many attempts ran and what each was told."""

    def __init__(self, *attempts: dict[int, int]) -> None:
        self.attempts = attempts
        self.plans: list[Plan] = []
        self.groups: list[ScriptedGroup] = []

    def launch(self, plan: Plan) -> ScriptedGroup:
        script = self.attempts[len(self.plans)]
        self.plans.append(plan)
        exits = [Exit(role="worker", rank=r, returncode=c) for r, c in script.items()]
        self.groups.append(ScriptedGroup(exits))
        return self.groups[-1]


def never_runs() -> None:
    """The job's function: a scripted group runs no code."""


KILLED = -signal.SIGKILL


def test_a_signal_beats_an_exit_code_as_the_root_cause():
    # rank 0's exit code comes first and from the lower rank; rank 1's SIGKILL is the cause
    engine = ScriptedEngine({0: 1, 1: KILLED})
    with pytest.raises(WorkerError) as info:
        corral.run(never_runs, workers=2, engine=engine)
    assert (info.value.rank, info.value.detail) == (1, "was killed by SIGKILL")
    assert info.value.remote_traceback == "last words of worker 1"  # its log's tail
    assert info.value.restarts == 0 and len(engine.plans) == 1 and engine.groups[0].stopped


def test_restarts_are_counted_and_the_job_gives_up_after_max_restarts(caplog):
    engine = ScriptedEngine({1: KILLED}, {1: KILLED}, {1: KILLED}, {1: KILLED})
    with pytest.raises(WorkerError, match=r"worker 1 was killed by SIGKILL \(after 2 restart"):
        corral.run(never_runs, workers=2, max_restarts=2, engine=engine)
    assert len(engine.plans) == 3  # the first attempt and two restarts, no fourth
    # each attempt tells its processes its number, as torchrun does
    told = [{p.env["TORCHELASTIC_RESTART_COUNT"] for p in plan.processes} for plan in engine.plans]
    assert told == [{"0"}, {"1"}, {"2"}]
    assert all(group.stopped for group in engine.groups)
    assert "restarting all workers, attempt 2 of 3" in caplog.text
    assert "attempt 3 of 3" in caplog.text and "attempt 4" not in caplog.text


def test_the_error_after_restarts_is_the_last_attempts_own():
    engine = ScriptedEngine({1: KILLED}, {0: 3})
    with pytest.raises(WorkerError) as info:
        corral.run(never_runs, workers=2, max_restarts=1, engine=engine)
    assert (info.value.rank, info.value.detail, info.value.restarts) == (
        0,
        "exited with code 3",
        1,
    )
    assert len(engine.plans) == 2


def test_without_max_restarts_a_failure_ends_the_job_at_once():
    engine = ScriptedEngine({0: 2}, {})
    with pytest.raises(WorkerError, match="worker 0 exited with code 2"):
        corral.run(never_runs, workers=2, engine=engine)
    assert len(engine.plans) == 1
