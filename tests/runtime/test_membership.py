"""Membership as pure decisions: meetings, joining successors, leaving and lost workers."""

from __future__ import annotations

import numpy as np

from corral.runtime.membership import Membership, Reply, Share, untrained


def ones(value: float = 1.0) -> np.ndarray:
    return np.full(2, value)


def sent(replies: list[Reply[str]]) -> dict[str, dict]:
    """Who got what: header, plus the summed array as a list where there is one."""
    out = {}
    for reply in replies:
        assert reply.to not in out, f"{reply.to} answered twice"
        out[reply.to] = {
            **reply.header,
            **({"sums": reply.arrays[0].tolist()} if reply.arrays else {}),
        }
    return out


def test_a_meeting_answers_everyone_with_the_total_once_all_members_came():
    m = Membership[str](range(3))
    assert m.meet("a", worker=0, epoch=1, sums=ones(1)).replies == []
    assert m.meet("a2", worker=0, epoch=1, sums=ones(1)).replies == []  # resent: counted once
    assert m.meet("b", worker=1, epoch=1, sums=ones(2)).replies == []
    decision = m.meet("c", worker=2, epoch=1, sums=ones(4))
    everyone = {"members": [0, 1, 2], "sums": [7.0, 7.0]}
    assert sent(decision.replies) == dict.fromkeys(["a", "a2", "b", "c"], everyone)
    assert decision.admitted == []


def test_meetings_of_two_epochs_are_summed_apart():
    m = Membership[str](range(2))
    m.meet("a1", worker=0, epoch=1, sums=ones(1))
    m.meet("a2", worker=0, epoch=2, sums=ones(10))
    assert sent(m.meet("b2", worker=1, epoch=2, sums=ones(20)).replies) == {
        "a2": {"members": [0, 1], "sums": [30.0, 30.0]},
        "b2": {"members": [0, 1], "sums": [30.0, 30.0]},
    }
    assert sent(m.meet("b1", worker=1, epoch=1, sums=ones(2)).replies) == {
        "a1": {"members": [0, 1], "sums": [3.0, 3.0]},
        "b1": {"members": [0, 1], "sums": [3.0, 3.0]},
    }


def test_meetings_released_together_are_answered_in_epoch_order():
    m = Membership[str](range(2))
    m.meet("a2", worker=0, epoch=2, sums=ones(1))
    m.meet("a1", worker=0, epoch=1, sums=ones(1))
    _, decision = m.leave(1, clock=0)
    assert [r.to for r in decision.replies] == ["a1", "a2"]


def test_a_member_that_leaves_releases_the_meeting_that_waited_for_it():
    m = Membership[str](range(2))
    m.meet("a", worker=0, epoch=3, sums=ones(5))
    done, decision = m.leave(1, clock=40)
    assert done == {}  # it began no epoch: nothing is left undone
    assert sent(decision.replies) == {"a": {"members": [0], "sums": [5.0, 5.0]}}
    assert m.members == {0}


def test_a_lost_worker_leaves_an_account_of_its_epoch():
    m = Membership[str](range(2))
    m.begin_epoch(1, Share(epoch=2, steps=9, samples=140, clock=9))
    done, _ = m.lost(1, successor=None, clock=13)
    assert done == {"epoch": 2, "steps": 9, "samples": 140, "steps_done": 4}
    assert m.lost(1, successor=None, clock=13)[0] == {}  # told twice: accounted once


def test_the_next_meeting_waits_for_the_successor_and_admits_it():
    m = Membership[str](range(3))
    m.begin_epoch(1, Share(epoch=2, steps=9, samples=140, clock=9))
    m.meet("a", worker=0, epoch=2, sums=ones(1))
    done, decision = m.lost(1, successor=3, clock=11)
    assert done["steps_done"] == 2 and decision.replies == []
    assert m.meet("c", worker=2, epoch=2, sums=ones(1)).replies == []  # 3 is not here yet
    decision = m.join("s", worker=3)
    assert decision.admitted == [3] and m.members == {0, 2, 3}
    assert sent(decision.replies) == {
        "a": {"members": [0, 2, 3], "sums": [2.0, 2.0]},
        "c": {"members": [0, 2, 3], "sums": [2.0, 2.0]},
        "s": {"epoch": 3, "members": [0, 2, 3]},
    }
    # from epoch 3 the successor is a member like any other: the meeting waits for it
    m.meet("a", worker=0, epoch=3, sums=ones(1))
    assert m.meet("c", worker=2, epoch=3, sums=ones(1)).replies == []
    assert len(m.meet("s", worker=3, epoch=3, sums=ones(1)).replies) == 3


def test_a_joiner_that_came_early_waits_for_the_next_meeting():
    m = Membership[str](range(2))
    m.lost(1, successor=2, clock=0)
    assert m.join("s", worker=2).replies == []
    decision = m.meet("a", worker=0, epoch=5, sums=ones(1))
    assert sent(decision.replies)["s"] == {"epoch": 6, "members": [0, 2]}


def test_waiting_joiners_hear_the_job_is_over_once_every_member_left():
    m = Membership[str](range(1))
    m.lost(0, successor=None, clock=0)
    assert sent(m.join("late", worker=1).replies) == {"late": {"finished": True}}
    m2 = Membership[str](range(1))
    m2.join("early", worker=1)
    assert sent(m2.leave(0, clock=0)[1].replies) == {"early": {"finished": True}}


def test_a_joiner_is_not_told_the_job_is_over_while_a_member_trains():
    m = Membership[str](range(2))
    m.leave(0, clock=0)
    assert m.join("s", worker=2).replies == []


def test_a_restarted_host_that_learns_a_member_back_waits_for_it():
    m = Membership[str](range(1))  # restored from a checkpoint older than worker 1's join
    m.add(1)
    assert m.meet("a", worker=0, epoch=4, sums=ones(1)).replies == []
    assert len(m.meet("b", worker=1, epoch=4, sums=ones(1)).replies) == 2


def test_a_gather_sums_over_the_current_members_and_admits_nobody():
    m = Membership[str](range(2))
    m.lost(1, successor=2, clock=0)
    m.join("j", worker=2)
    decision = m.gather("a", worker=0, key="sync-0", values=ones(3))
    assert sent(decision.replies) == {"a": {"members": [0], "sums": [3.0, 3.0]}}
    assert decision.admitted == [] and m.members == {0}  # the joiner waits for a meeting


def test_a_gather_is_released_by_a_member_that_left_after_adding():
    m = Membership[str](range(3))
    m.gather("a", worker=0, key="k", values=ones(1))
    m.gather("b", worker=1, key="k", values=ones(1))
    _, decision = m.leave(2, clock=0)
    both = {"members": [0, 1], "sums": [2.0, 2.0]}
    assert sent(decision.replies) == {"a": both, "b": both}


def test_a_lost_workers_account_counts_the_larger_batches_first():
    # 10 samples in 3 steps are batches of 4, 3, 3: after 2 steps 7 are trained
    done = {"epoch": 1, "steps": 3, "samples": 10, "steps_done": 2}
    assert untrained(done) == {
        "epoch": 2,
        "steps_done": 2,
        "steps": 3,
        "samples_not_trained": 3,
    }
    assert untrained({}) == {}
