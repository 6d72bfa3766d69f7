"""Decentralised gossip averaging: no server; after each step, average with a random peer.

Asynchronous decentralised parallel SGD (AD-PSGD; Lian et al., "Asynchronous Decentralized
Parallel Stochastic Gradient Descent", ICML 2018): every worker steps with its own
optimizer, then exchanges parameters with `peers` randomly chosen workers and moves to the
pairwise average. Nobody waits for the slowest worker — a straggler only slows the peers
that happen to pick it — which is why gossip keeps its speed under persistent stragglers.

Each worker runs a small answering thread on its own CURVE-authenticated socket. It never
touches the model (the training thread may be in the middle of a backward pass): it
replies with the worker's last published parameters and leaves the peer's parameters in a
mailbox, which the owner folds in at its next step. So each exchange averages both sides,
the owner's half a step later. At the end of every epoch all replicas are averaged exactly
with one all-reduce, so evaluation and checkpoints see one model.
"""

from __future__ import annotations

import os
import random
import threading
from collections import deque
from datetime import timedelta
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import zmq
from pydantic import Field, PrivateAttr

from corral.comm.curve import JobKeys, secure_client, secure_server, start_authenticator
from corral.comm.frames import pack, unpack
from corral.engines.base import Resources, serving_host
from corral.errors import CorralError, SpecError
from corral.strategies.averaging import average_, broadcast_
from corral.strategies.base import StepResult, Strategy
from corral.train.context import Context
from corral.train.roles import Role

_ADDRESS_KEY = "corral/gossip/{}"
_TIMEOUT_MS = 60_000


class _Mailbox:
    """The answering thread of one worker: serves snapshots, collects peers' parameters."""

    def __init__(self, keys: JobKeys, host: str, values: np.ndarray) -> None:
        self._zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth = start_authenticator(self._zctx, keys)
        self._sock = self._zctx.socket(zmq.ROUTER)
        secure_server(self._sock, keys)
        self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self._lock = threading.Lock()
        self._snapshot = values.copy()
        self.received: deque[np.ndarray] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="gossip", daemon=True)
        self._thread.start()

    def publish(self, values: np.ndarray) -> None:
        with self._lock:
            self._snapshot = values.copy()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            ident, *frames = self._sock.recv_multipart(copy=False)
            _, (theirs,) = unpack(frames)
            self.received.append(theirs.copy())
            with self._lock:
                reply = pack({}, [self._snapshot])
            self._sock.send_multipart([ident, *reply], copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._auth.stop()
        self._sock.close(linger=0)
        self._zctx.term()


class Gossip(Strategy):
    """After every step, average parameters with `peers` random other workers.

    Example:
        >>> corral.Gossip(peers=1)
    """

    kind: Literal["gossip"] = "gossip"
    peers: int = Field(1, ge=1, description="peers to average with after each step")

    _keys: JobKeys | None = PrivateAttr(default=None)
    _model: torch.nn.Module | None = PrivateAttr(default=None)
    _optimizer: torch.optim.Optimizer | None = PrivateAttr(default=None)
    _mailbox: _Mailbox | None = PrivateAttr(default=None)
    _peers: dict[int, zmq.Socket[bytes]] = PrivateAttr(default_factory=dict)
    _zctx: zmq.Context[zmq.Socket[bytes]] | None = PrivateAttr(default=None)
    _rng: random.Random | None = PrivateAttr(default=None)
    _rank: int = PrivateAttr(default=0)

    def prepare_job(self, *, workers: int, resources: Resources) -> list[Role]:
        if workers > 1 and self.peers > workers - 1:
            raise SpecError(
                f"strategy.peers: {self.peers} is more than the {workers - 1} other workers"
            )
        self._keys = JobKeys.generate()
        return []

    def setup(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context
    ) -> torch.nn.Module:
        if self._keys is None:
            raise SpecError("the gossip strategy must be launched by corral")
        broadcast_([p.data for p in model.parameters()])
        host = serving_host()
        values = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy()
        self._mailbox = _Mailbox(self._keys, host, values)
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            None,
            False,
            timeout=timedelta(minutes=5),
        )
        store.set(_ADDRESS_KEY.format(ctx.rank), f"{host}:{self._mailbox.port}")
        self._zctx = zmq.Context()
        for peer in range(ctx.world_size):
            if peer == ctx.rank:
                continue
            sock = self._zctx.socket(zmq.DEALER)
            secure_client(sock, self._keys)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{store.get(_ADDRESS_KEY.format(peer)).decode()}")
            self._peers[peer] = sock
        self._model, self._optimizer, self._rank = model, optimizer, ctx.rank
        self._rng = random.Random(1000 + ctx.rank)
        return model

    def step(self, loss: torch.Tensor) -> StepResult:
        model, opt, mailbox = self._model, self._optimizer, self._mailbox
        assert model is not None and opt is not None and mailbox is not None and self._rng
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().copy()
        while mailbox.received:  # peers that averaged with us since our last step
            flat = (flat + mailbox.received.popleft()) / 2
        for peer in self._rng.sample(sorted(self._peers), min(self.peers, len(self._peers))):
            flat = (flat + self._exchange(peer, flat)) / 2
        device = next(model.parameters()).device
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.from_numpy(flat).to(device), model.parameters()
            )
        mailbox.publish(flat)
        return StepResult(synced=bool(self._peers))

    def _exchange(self, peer: int, flat: np.ndarray) -> np.ndarray:
        sock = self._peers[peer]
        sock.send_multipart(pack({}, [flat]), copy=False)
        if not sock.poll(_TIMEOUT_MS):
            raise CorralError(f"gossip peer {peer} did not answer within {_TIMEOUT_MS // 1000} s")
        _, (theirs,) = unpack(sock.recv_multipart(copy=False))
        return theirs

    def finish_epoch(self) -> None:
        assert self._model is not None and self._mailbox is not None
        self._mailbox.received.clear()  # the exact average below supersedes pending ones
        with torch.no_grad():
            average_([p.data for p in self._model.parameters()])
        flat = torch.nn.utils.parameters_to_vector(self._model.parameters()).detach().cpu().numpy()
        self._mailbox.publish(flat)

    def finish(self) -> None:
        dist.barrier()  # nobody may still be asking us for parameters
        for sock in self._peers.values():
            sock.close(linger=0)
        self._peers.clear()
        if self._zctx is not None:
            self._zctx.term()
        if self._mailbox is not None:
            self._mailbox.close()
