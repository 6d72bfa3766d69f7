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

import random
import threading
from collections import deque
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from corral.errors import CorralError, SpecError
from corral.runtime.resources import Resources
from corral.strategies.averaging import average_, broadcast_
from corral.strategies.base import DataParallel, LossFn, Strategy, StrategyPlan

# torch, NumPy and ZeroMQ are imported in plan() and the replica's methods: the spec
# reads `Gossip` without them.
if TYPE_CHECKING:
    import numpy as np
    import torch
    import zmq

    from corral.comm.curve import JobKeys
    from corral.runtime.context import Context

_ADDRESS_KEY = "corral/gossip/{}"
_TIMEOUT_MS = 60_000


class _Mailbox:
    """The answering thread of one worker: serves snapshots, collects peers' parameters."""

    def __init__(self, keys: JobKeys, host: str, values: np.ndarray) -> None:
        import zmq

        from corral.comm.curve import secure_server, start_authenticator

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
        from corral.comm.frames import pack, unpack

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

    def plan(self, *, workers: int, helpers: Resources) -> StrategyPlan:
        from corral.comm.curve import JobKeys

        if workers > 1 and self.peers > workers - 1:
            raise SpecError(
                f"strategy.peers: {self.peers} is more than the {workers - 1} other workers"
            )
        return StrategyPlan(keys=JobKeys.generate())

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> _GossipReplica:
        if plan.keys is None:
            raise SpecError("the gossip strategy must be launched by corral")
        assert optimizer is not None  # needs_optimizer: Trainer checked
        return _GossipReplica(self.peers, plan.keys, model, optimizer, loss, ctx)


class _GossipReplica(DataParallel):
    def __init__(
        self,
        peers: int,
        keys: JobKeys,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        ctx: Context,
    ) -> None:
        import zmq

        from corral.comm.curve import secure_client

        super().__init__(model, optimizer, loss, ctx)
        broadcast_([p.data for p in model.parameters()])
        self.mailbox = _Mailbox(keys, ctx.serving_host, self._flat())
        ctx.store.set(_ADDRESS_KEY.format(ctx.rank), f"{ctx.serving_host}:{self.mailbox.port}")
        self.zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.peers: dict[int, zmq.Socket[bytes]] = {}
        for peer in range(ctx.world_size):
            if peer == ctx.rank:
                continue
            sock = self.zctx.socket(zmq.DEALER)
            secure_client(sock, keys)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{ctx.store.get(_ADDRESS_KEY.format(peer)).decode()}")
            self.peers[peer] = sock
        self.fanout = min(peers, len(self.peers))
        self.rng = random.Random(1000 + ctx.rank)

    def _flat(self) -> np.ndarray:
        import torch

        vector = torch.nn.utils.parameters_to_vector(self.model.parameters())
        return vector.detach().cpu().numpy().copy()

    def update(self, loss: torch.Tensor) -> bool:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        flat, mailbox = self._flat(), self.mailbox
        while mailbox.received:  # peers that averaged with us since our last step
            flat = (flat + mailbox.received.popleft()) / 2
        for peer in self.rng.sample(sorted(self.peers), self.fanout):
            flat = (flat + self._exchange(peer, flat)) / 2
        device = next(self.model.parameters()).device
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.from_numpy(flat).to(device), self.model.parameters()
            )
        mailbox.publish(flat)
        return bool(self.peers)

    def _exchange(self, peer: int, flat: np.ndarray) -> np.ndarray:
        from corral.comm.frames import pack, unpack

        sock = self.peers[peer]
        sock.send_multipart(pack({}, [flat]), copy=False)
        if not sock.poll(_TIMEOUT_MS):
            raise CorralError(f"gossip peer {peer} did not answer within {_TIMEOUT_MS // 1000} s")
        _, (theirs,) = unpack(sock.recv_multipart(copy=False))
        return theirs

    def sync(self) -> None:
        import torch

        self.mailbox.received.clear()  # the exact average below supersedes pending ones
        with torch.no_grad():
            average_([p.data for p in self.model.parameters()])
        self.mailbox.publish(self._flat())

    def close(self) -> None:
        import torch.distributed as dist

        dist.barrier()  # nobody may still be asking us for parameters
        for sock in self.peers.values():
            sock.close(linger=0)
        self.peers.clear()
        self.zctx.term()
        self.mailbox.close()
