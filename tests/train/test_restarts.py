from corral.train.restarts import Failure, GiveUp, Restart, decide


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
