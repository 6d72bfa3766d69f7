"""Gossip's mailbox answers only the job's own workers: a real rogue ZeroMQ client with
its own CURVE keys gets no answer and leaves nothing in the model.

As for the parameter server (`tests/ps/test_parameter_server.py`), the rogue has the worst
case's keys (`conftest.rogue_keys`): the job's server public key, its own client keypair.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zmq
from conftest import rogue_keys

import corral
from corral.comm.curve import JobKeys, secure_client
from corral.comm.frames import pack, unpack
from corral.runtime.resources import Resources
from corral.strategies import Batch, StrategyPlan

# the store key under which each worker publishes its mailbox's address
from corral.strategies.gossip import _ADDRESS_KEY
from corral.train.launcher import LaunchOptions, launch

pytestmark = pytest.mark.slow

#: What the rogue offers as its parameters: averaged in once, it would dominate them.
POISON = 1e6


def ask(address: str, keys: JobKeys, values: np.ndarray, timeout_ms: int) -> np.ndarray | None:
    """Offer `values` to the mailbox at `address` as a gossip peer holding `keys`; returns
    its parameters, or None without an answer in `timeout_ms`."""
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    secure_client(sock, keys)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    try:
        sock.send_multipart(pack({}, [values]), copy=False)
        if not sock.poll(timeout_ms):
            return None
        _, (theirs,) = unpack(sock.recv_multipart(copy=False))
        return theirs.copy()
    finally:
        sock.close(linger=0)
        zctx.term()


def probe_worker_one(strategy: corral.Gossip, plan: StrategyPlan) -> dict:
    """Every worker builds its gossip replica; worker 0 then calls worker 1's mailbox as a
    rogue and with the job's keys, and both take a step and the epoch's exact average."""
    dist.init_process_group("gloo")
    ctx = corral.context()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    replica = strategy.build(model, optimizer, torch.nn.functional.cross_entropy, ctx, plan)
    out: dict = {}
    if ctx.rank == 0:
        address = ctx.store.get(_ADDRESS_KEY.format(1)).decode()
        mine = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
        poison = np.full_like(mine, POISON)
        assert plan.keys is not None
        out["rogue"] = ask(address, rogue_keys(plan.keys), poison, timeout_ms=2000)
        # the job's key gets worker 1's parameters: the same as ours since build broadcast
        theirs = ask(address, plan.keys, mine, timeout_ms=30_000)
        out["legit"] = theirs is not None and np.array_equal(theirs, mine)
    dist.barrier()  # worker 1 steps only once both offers were made
    x = torch.randn(8, 4)
    replica.step(Batch(x, (x[:, 0] > 0).long(), epoch=0, index=0))
    replica.sync()
    out["largest"] = max(p.abs().max().item() for p in model.parameters())
    replica.close()
    dist.destroy_process_group()
    return out


def test_a_client_without_the_job_key_gets_no_answer_and_injects_nothing():
    strategy = corral.Gossip(peers=1)
    plan = strategy.plan(workers=2, helpers=Resources())
    opts = LaunchOptions(workers=2, membership=plan.keys)  # as Trainer launches gossip
    out = launch(probe_worker_one, (strategy, plan), opts)
    assert out["rogue"] is None  # no answer: the handshake was refused
    assert out["legit"]  # while the job's own key got worker 1's parameters
    assert out["largest"] < 10  # and none of the rogue's POISON reached the model
