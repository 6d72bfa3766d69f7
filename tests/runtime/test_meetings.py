"""The driver's membership host on real ZeroMQ sockets: meetings across threads, a lost
worker's account from its counted steps, and a client without the job's keys refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import rogue_keys

from corral.comm.curve import JobKeys
from corral.errors import CorralError
from corral.runtime.meetings import MembershipClient, MembershipHost


@pytest.fixture
def host():
    keys = JobKeys.generate()
    host = MembershipHost(keys, "127.0.0.1", workers=2)
    yield host, keys
    host.close()


def test_workers_meet_and_a_lost_one_is_accounted_from_its_counted_steps(host):
    host, keys = host
    a, b = (MembershipClient(host.address, keys, rank) for rank in range(2))
    caller = MembershipClient(host.address, keys, worker=-1)
    try:
        out: dict[str, object] = {}
        met = threading.Thread(target=lambda: out.update(a=a.meet(0, np.ones(2))))
        met.start()
        b.meet(0, np.full(2, 2.0))
        met.join()
        total, members = out["a"]  # type: ignore[misc]
        assert total.tolist() == [3.0, 3.0] and members == [0, 1]
        b.begin_epoch(1, steps=4, samples=10)
        for _ in range(3):
            b.count_step()
        b.settle()  # counted by the host before b may die
        assert caller.lost(1, successor=None) == {
            "epoch": 1,
            "steps": 4,
            "samples": 10,
            "steps_done": 3,
        }
        assert a.members() == [0]
        assert a.meet(1, np.ones(1))[1] == [0]  # nobody waits for the lost worker
    finally:
        for client in (a, b, caller):
            client.close()


def test_a_client_without_the_job_keys_gets_no_answer(host):
    host, keys = host
    with pytest.raises(CorralError, match="did not answer within 1 s"):
        MembershipClient(host.address, rogue_keys(keys), 0, handshake_s=1.0)


def test_an_unknown_operation_is_answered_with_an_error(host):
    host, keys = host
    client = MembershipClient(host.address, keys, 0)
    try:
        with pytest.raises(CorralError, match="unknown operation 'vote'"):
            client._request({"op": "vote"})
    finally:
        client.close()
