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
(a sum over the members on the driver's membership host), so evaluation and checkpoints
see one model.

Workers share no process group: a worker that dies costs only its share of the current
epoch. A peer that stops answering is asked about at the host; once the launcher has
reported it lost, the others stop picking it, train on, and share its data from the next
epoch; a successor (if ``max_restarts`` allows one) joins at the next epoch's start, from
a member's current parameters. See `corral.strategies.members`.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from corral.errors import CorralError, SpecError
from corral.runtime.resources import Resources
from corral.strategies.base import DataParallel, LossFn, Strategy, StrategyPlan
from corral.strategies.members import MemberReplica, MembersSupervisor

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
#: How long a peer may stay silent before the membership host is asked whether it is lost.
_ASK_MS = 500


class _Mailbox:
    """The answering thread of one worker: serves snapshots, collects peers' parameters."""

    def __init__(self, keys: JobKeys, host: str, values: np.ndarray) -> None:
        from corral.comm.curve import SecureRouter

        self._router = SecureRouter(keys, host)
        self._sock, self.port = self._router.sock, self._router.port
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
            header, arrays = unpack(frames)
            if header.get("op") != "pull":  # a joiner only takes; a peer also gives
                self.received.append(arrays[0].copy())
            with self._lock:
                reply = pack({}, [self._snapshot])
            self._sock.send_multipart([ident, *reply], copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._router.close()


class Gossip(Strategy):
    """After every step, average parameters with `peers` random other workers.

    Example:
        >>> corral.Gossip(peers=1)
    """

    uses_process_group: ClassVar[bool] = False

    kind: Literal["gossip"] = "gossip"
    peers: int = Field(1, ge=1, description="peers to average with after each step")

    def plan(self, *, workers: int, helpers: Resources) -> StrategyPlan:
        from corral.comm.curve import JobKeys

        if workers > 1 and self.peers > workers - 1:
            raise SpecError(
                f"strategy.peers: {self.peers} is more than the {workers - 1} other workers"
            )
        keys = JobKeys.generate()
        return StrategyPlan(
            keys=keys,
            membership=True,
            tolerates_worker_loss=True,
            supervisor=MembersSupervisor(keys),
        )

    def build(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss: LossFn,
        ctx: Context,
        plan: StrategyPlan,
    ) -> _GossipReplica:
        if plan.keys is None or not plan.membership:
            raise SpecError("the gossip strategy must be launched by corral")
        assert optimizer is not None  # needs_optimizer: Trainer checked
        return _GossipReplica(self.peers, plan.keys, model, optimizer, loss, ctx)


class _GossipReplica(MemberReplica, DataParallel):
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

        from corral.runtime.meetings import MembershipClient

        super().__init__(model, optimizer, loss, ctx)
        self.keys, self.fanout = keys, peers
        self.members = MembershipClient.connect(ctx.store, keys, ctx.rank)
        self.mailbox = _Mailbox(keys, ctx.serving_host, self._flat())
        ctx.store.set(_ADDRESS_KEY.format(ctx.rank), f"{ctx.serving_host}:{self.mailbox.port}")
        self.zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.peers: dict[int, zmq.Socket[bytes]] = {}  # connected on first use
        self.current = list(range(ctx.world_size))  # this epoch's workers
        self.rng = random.Random(1000 + ctx.rank)
        self.epoch = 0  # the epoch being trained, which names its exact average
        if not ctx.joining:  # every worker starts from rank 0's parameters
            self._load(self._lowest_ranks_values())

    def _lowest_ranks_values(self) -> np.ndarray:
        """Rank 0's parameters, summed with nothing from the others (a flag counts rank
        0 in; without it, say dead before this, each worker keeps its own)."""
        import numpy as np

        flat = self._flat()
        mine = np.zeros(flat.size + 1)
        if self.ctx.rank == 0:
            mine[:-1], mine[-1] = flat, 1.0
        total, _ = self.members.gather("init", mine)
        return total[:-1].astype(flat.dtype) if total[-1] else flat

    def _flat(self) -> np.ndarray:
        import torch

        vector = torch.nn.utils.parameters_to_vector(self.model.parameters())
        return vector.detach().cpu().numpy().copy()

    def _load(self, flat: np.ndarray) -> None:
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.from_numpy(flat).to(device), self.model.parameters()
            )
        self.mailbox.publish(flat)

    def _peer(self, peer: int) -> zmq.Socket[bytes]:
        import zmq

        from corral.comm.curve import secure_client

        if peer not in self.peers:
            sock = self.zctx.socket(zmq.DEALER)
            secure_client(sock, self.keys)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{self.ctx.store.get(_ADDRESS_KEY.format(peer)).decode()}")
            self.peers[peer] = sock
        return self.peers[peer]

    def update(self, loss: torch.Tensor) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.members.count_step()  # answered while we talk to peers
        flat, mailbox = self._flat(), self.mailbox
        while mailbox.received:  # peers that averaged with us since our last step
            flat = (flat + mailbox.received.popleft()) / 2
        others = [p for p in self.current if p != self.ctx.rank]
        synced = False
        for peer in self.rng.sample(others, min(self.fanout, len(others))):
            theirs = self._exchange(peer, {}, flat)
            if theirs is not None:
                flat, synced = (flat + theirs) / 2, True
        self._load(flat)
        self.members.settle()
        return synced

    def _exchange(self, peer: int, header: dict, flat: np.ndarray) -> np.ndarray | None:
        """`peer`'s parameters for ours, or None if the driver says it is lost (it is
        not asked again this epoch)."""
        from corral.comm.frames import pack, unpack

        sock = self._peer(peer)
        sock.send_multipart(pack(header, [flat]), copy=False)
        waited = 0
        while not sock.poll(_ASK_MS):
            waited += _ASK_MS
            if peer not in self.members.members():
                self.current = [p for p in self.current if p != peer]  # the loop's is apart
                self.peers.pop(peer).close(linger=0)
                return None
            if waited >= _TIMEOUT_MS:
                raise CorralError(
                    f"gossip peer {peer} did not answer within {_TIMEOUT_MS // 1000} s"
                )
        _, (theirs,) = unpack(sock.recv_multipart(copy=False))
        return theirs

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        super().begin_epoch(epoch, steps=steps, samples=samples)
        self.epoch = epoch

    def sync(self) -> None:
        """The exact average over this epoch's surviving workers."""
        self.mailbox.received.clear()  # the exact average below supersedes pending ones
        flat = self._flat()
        total, came = self.members.gather(f"sync-{self.epoch}", flat)
        self._load((total / len(came)).astype(flat.dtype))

    def meet(self, epoch: int, sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        totals, members = super().meet(epoch, sums)
        self.current = list(members)
        return totals, members

    def join(self) -> tuple[int, list[int]] | None:
        """Start from the lowest member's current parameters."""
        joined = super().join()
        if joined is not None:
            self.current = list(joined[1])
            theirs = self._exchange(self.current[0], {"op": "pull"}, self._flat())
            if theirs is None:
                raise CorralError(f"worker {self.current[0]} was lost while this one joined")
            self._load(theirs.copy())
        return joined

    def close(self) -> None:
        # every member met after its last step: nobody asks us for parameters any more
        super().close()
        for sock in self.peers.values():
            sock.close(linger=0)
        self.peers.clear()
        self.zctx.term()
        self.mailbox.close()
