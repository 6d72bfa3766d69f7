"""The driver's membership host and the workers' client: `Membership` over ZeroMQ.

A strategy whose workers share no process group (so that a dead peer breaks nothing)
still meets at every epoch's end and must learn who trains the next epoch. The
parameter server hosts that on its shard 0; every other such strategy asks the driver:
`MembershipHost` runs there, started by the launcher for a plan that asks for it
(`StrategyPlan.membership`), on a thread, beside the rendezvous store it publishes its
address in. Workers (and the caller's supervisor, which reports lost workers) talk to it
with `MembershipClient`. Every connection is CURVE-authenticated with the job's keys.

Requests are ``{op, worker, …}`` headers with NumPy arrays (`corral.comm.frames`); the
replies come from `Membership`'s decisions, or at once:

``epoch`` {epoch, steps, samples} → {}      this worker's share of an epoch begins
``step``                          → {}      one step of it is done (counts for a loss)
``meet``  {epoch} [sums] → {members} [sums] the epoch-end sum; says who trains next
``gather`` {key} [values] → {members} [sum] a sum over the current members, no admission
``join``  → {epoch, members} | {finished}   a successor; answered at the next meeting
``leave`` → {}                              this worker is done
``lost``  {successor} → {epoch, steps, …}   the caller reports dead `worker`
``members`` → {members}                     who trains now (a peer that is gone is not)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from corral.comm.curve import JobKeys, SecureRouter, secure_client
from corral.comm.frames import pack, unpack
from corral.errors import CorralError
from corral.runtime.membership import Decision, Membership, Share

if TYPE_CHECKING:
    import torch.distributed as dist

#: The store key under which the driver publishes the host's address.
ADDRESS_KEY = "corral/membership"

Handler = Callable[[bytes, dict[str, Any], list[np.ndarray]], None]


class MembershipHost:
    """Serves one attempt's `Membership` of `workers` workers on a thread of the driver.

    Only the serving thread touches the membership, so it needs no lock; `close` stops
    it. The step counts it keeps are what a lost worker's account is computed from.
    """

    def __init__(self, keys: JobKeys, host: str, workers: int) -> None:
        self._router = SecureRouter(keys, host)
        self._sock, self.address = self._router.sock, self._router.address
        self.members: Membership[bytes] = Membership(range(workers))
        self.clocks: dict[int, int] = {}
        self.handlers: dict[str, Handler] = {
            "ping": lambda ident, header, arrays: self._send(ident, {}),
            "epoch": self._on_epoch,
            "step": self._on_step,
            "meet": self._on_meet,
            "gather": self._on_gather,
            "join": self._on_join,
            "leave": self._on_leave,
            "lost": self._on_lost,
            "members": self._on_members,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="membership", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            ident, *frames = self._sock.recv_multipart(copy=False)
            try:
                header, arrays = unpack(frames)
                handler = self.handlers.get(header.get("op", ""))
                if handler is None:
                    self._send(ident.bytes, {"error": f"unknown operation {header.get('op')!r}"})
                    continue
                handler(ident.bytes, header, arrays)
            except (ValueError, KeyError, TypeError) as exc:  # a malformed request
                self._send(ident.bytes, {"error": f"bad request: {exc}"})

    def _send(
        self, ident: bytes, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> None:
        self._sock.send_multipart([ident, *pack(header, arrays)], copy=False)

    def _carry_out(self, decision: Decision[bytes]) -> None:
        for reply in decision.replies:
            self._send(reply.to, reply.header, reply.arrays)

    def _on_epoch(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        worker = header["worker"]
        share = Share(
            epoch=header["epoch"],
            steps=header["steps"],
            samples=header["samples"],
            clock=self.clocks.get(worker, 0),
        )
        self.members.begin_epoch(worker, share)
        self._send(ident, {})

    def _on_step(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.clocks[header["worker"]] = self.clocks.get(header["worker"], 0) + 1
        self._send(ident, {})

    def _on_meet(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        worker, epoch = header["worker"], header["epoch"]
        self._carry_out(self.members.meet(ident, worker=worker, epoch=epoch, sums=arrays[0]))

    def _on_gather(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        worker, key = header["worker"], header["key"]
        self._carry_out(self.members.gather(ident, worker=worker, key=key, values=arrays[0]))

    def _on_join(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self._carry_out(self.members.join(ident, worker=header["worker"]))

    def _on_leave(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        worker = header["worker"]
        _, decision = self.members.leave(worker, clock=self.clocks.get(worker, 0))
        self._carry_out(decision)
        self._send(ident, {})

    def _on_lost(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        worker = header["worker"]
        done, decision = self.members.lost(
            worker, successor=header["successor"], clock=self.clocks.get(worker, 0)
        )
        self._carry_out(decision)
        self._send(ident, done)

    def _on_members(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self._send(ident, {"members": sorted(self.members.members)})

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._router.close()


class MembershipClient:
    """One process's connection to the membership host.

    `count_step` does not wait for its answer, so a strategy can overlap it with its own
    communication; the next request (or `settle`) collects it. A step counts once the
    host has it, so a replica settles before its next step may die.
    """

    def __init__(
        self, address: str, keys: JobKeys, worker: int, *, handshake_s: float = 30.0
    ) -> None:
        self.address, self.worker = address, worker
        self._zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._zctx.socket(zmq.DEALER)
        secure_client(self._sock, keys)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://{address}")
        self._unanswered = 0
        self._request({"op": "ping"}, timeout_s=handshake_s)

    @classmethod
    def connect(cls, store: dist.Store, keys: JobKeys, worker: int) -> MembershipClient:
        """Connect to the host the driver published in the job's `store`."""
        return cls(store.get(ADDRESS_KEY).decode(), keys, worker)

    def _receive(self, timeout_s: float | None) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The next reply; waits without end when `timeout_s` is None (a meeting waits
        for the slowest worker, and the launcher stops this process if the job fails)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._sock.poll(1000):
            if deadline is not None and time.monotonic() >= deadline:
                raise CorralError(
                    f"the job's membership host at {self.address} did not answer within "
                    f"{timeout_s:.0f} s (is the driver running, and does this process "
                    "hold the job's key?)"
                )
        header, arrays = unpack(self._sock.recv_multipart(copy=False))
        if "error" in header:
            raise CorralError(f"membership host: {header['error']}")
        return header, [a.copy() for a in arrays]

    def settle(self) -> None:
        """Collect the answers to every `count_step` sent so far."""
        while self._unanswered:
            self._receive(30.0)
            self._unanswered -= 1

    def _request(
        self,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        timeout_s: float | None = 30.0,
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        self.settle()
        self._sock.send_multipart(pack({"worker": self.worker, **header}, arrays), copy=False)
        return self._receive(timeout_s)

    def count_step(self) -> None:
        """One step of this worker's share is done; see the class docstring."""
        self._sock.send_multipart(pack({"op": "step", "worker": self.worker}), copy=False)
        self._unanswered += 1

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        self._request({"op": "epoch", "epoch": epoch, "steps": steps, "samples": samples})

    def meet(self, epoch: int, sums: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """`epoch`'s sum over its workers (waits for all) and the next epoch's workers."""
        header, (total,) = self._request({"op": "meet", "epoch": epoch}, [sums], timeout_s=None)
        return total, header["members"]

    def gather(self, key: str, values: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """The sum of `values` over the current members, and who added to it."""
        header, (total,) = self._request({"op": "gather", "key": key}, [values], timeout_s=None)
        return total, header["members"]

    def join(self) -> tuple[int, list[int]] | None:
        """For a successor: the epoch it starts at and that epoch's workers, once it may
        start; None if the job finished meanwhile."""
        header, _ = self._request({"op": "join"}, timeout_s=None)
        return None if header.get("finished") else (header["epoch"], header["members"])

    def leave(self) -> None:
        self._request({"op": "leave"})

    def lost(self, worker: int, successor: int | None) -> dict[str, int]:
        """Report dead `worker` (and who replaces it); returns what it left undone."""
        header, _ = self._request({"op": "lost", "worker": worker, "successor": successor})
        return header

    def members(self) -> list[int]:
        """Who trains now: a dead worker is gone from this as soon as the caller says so."""
        return self._request({"op": "members"})[0]["members"]

    def close(self) -> None:
        self._sock.close(linger=0)
        self._zctx.term()
