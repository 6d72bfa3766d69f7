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
