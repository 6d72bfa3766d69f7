"""The control channel: real sockets on 127.0.0.1, the driver's side and a worker's."""

from __future__ import annotations

import multiprocessing
import socket
import threading

import pytest

from corral.comm.control import ControlClient, ControlServer


def _acceptors() -> int:
    return sum(t.name == "control-accept" for t in threading.enumerate())


def test_close_ends_the_accepting_thread_and_frees_the_port():
    before = _acceptors()
    server = ControlServer()
    assert _acceptors() == before + 1
    server.close()
    assert _acceptors() == before
    probe = socket.socket()
    probe.bind(server.address)  # nothing listens there any more
    probe.close()


def test_a_peer_that_fails_the_challenge_does_not_shut_out_the_workers():
    server = ControlServer()
    with pytest.raises(multiprocessing.AuthenticationError):
        ControlClient(server.address, b"not the key" * 3, "worker", 9)
    with socket.create_connection(server.address) as rude:  # connects, then resets
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client = ControlClient(server.address, server.authkey, "worker", 0)
    client.send({"kind": "report", "n": 1})
    message = server.messages.get(timeout=10)
    assert (message.role, message.rank, message.body) == ("worker", 0, {"kind": "report", "n": 1})
    client.close()
    assert server.messages.get(timeout=10).body is None  # the closed connection is seen
    server.close()


def test_close_wakes_a_reader_whose_worker_is_still_connected():
    server = ControlServer()
    client = ControlClient(server.address, server.authkey, "worker", 1)
    client.send({"kind": "report"})
    assert server.messages.get(timeout=10).body == {"kind": "report"}
    server.close()
    assert server.messages.get(timeout=10).body is None  # its reader ended, not left blocked
    client.close()
