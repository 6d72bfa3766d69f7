"""The worker's side of the parameter server: one DEALER socket per shard, all in flight at once.

A step sends every shard its slice of the flat gradient first and only then collects the
replies, so pushes and pulls of all shards overlap instead of queueing one after another.

A server that dies and is restarted in place (same address, restored from its shard
checkpoint) publishes a new *incarnation* number in the job's store. While waiting for a
reply the client checks that number every second; when it changed, it opens a fresh
socket to the server and sends the request again. The old socket may meanwhile have
reconnected and delivered the first copy (ZeroMQ reconnects by itself), so pushes carry
a sequence number and the server answers a repeated push without applying it again;
a repeated epoch-end sum is likewise counted once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
import zmq

from corral.comm.curve import JobKeys, secure_client
from corral.comm.frames import pack, unpack
from corral.errors import CorralError
from corral.ps.layout import Layout

#: Where server `i` publishes how often it was started (1 at the first start).
INCARNATION_KEY = "corral/ps/server/{}/incarnation"
#: How often a waiting client checks whether a server was restarted.
_CHECK_MS = 1000


class PSClient:
    """Connection of one worker to every server of the job.

    `handshake_s` bounds the first exchange: a server that has not answered by then is down
    or refused our key (a failed CURVE handshake is silent in ZeroMQ). Later exchanges may
    legitimately wait for slow workers (sync, ssp), so they get the longer `timeout_s`.
    """

    def __init__(
        self,
        addresses: list[str],
        keys: JobKeys,
        worker: int,
        *,
        timeout_s: float = 300.0,
        handshake_s: float = 30.0,
        store: dist.Store | None = None,
    ) -> None:
        self.handshake_ms = int(handshake_s * 1000)
        self.addresses, self.worker = addresses, worker
        self.timeout_ms = int(timeout_s * 1000)
        self._zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._keys, self._store = keys, store
        self.socks = [self._connect(address) for address in addresses]
        self.incarnations = [self._incarnation(i) for i in range(len(addresses))]
        self.versions = [0] * len(addresses)
        self._steps = 0
        self._out: np.ndarray | None = None

    def _connect(self, address: str) -> zmq.Socket[bytes]:
        sock = self._zctx.socket(zmq.DEALER)
        secure_client(sock, self._keys)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{address}")
        return sock

    def _incarnation(self, i: int) -> int:
        """Server `i`'s restart count as published in the store (0 without a store)."""
        if self._store is None:
            return 0
        return int(self._store.add(INCARNATION_KEY.format(i), 0))  # adding 0 only reads

    def _await(self, i: int, request: list[Any], timeout_ms: int) -> bool:
        """Wait for server `i`'s reply; resend `request` to a restarted server."""
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            wait_ms = _CHECK_MS if deadline is None else (deadline - time.monotonic()) * 1000
            if self.socks[i].poll(max(0, min(_CHECK_MS, int(wait_ms)))):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            incarnation = self._incarnation(i)
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.socks[i].close(linger=0)
                self.socks[i] = self._connect(self.addresses[i])
                self.socks[i].send_multipart(request, copy=False)

    def _exchange(
        self, requests: list[tuple[dict[str, Any], list[np.ndarray]]], timeout_ms: int | None = None
    ) -> list[Any]:
        """Send request ``i`` to server ``i`` (fewer requests: the first servers only).

        ``timeout_ms=-1`` waits for as long as it takes: meetings and joins wait for the
        slowest worker, and the launcher stops this process if a server dies.
        """
        timeout_ms = timeout_ms or self.timeout_ms
        frames = [pack(header, arrays) for header, arrays in requests]
        for sock, request in zip(self.socks, frames, strict=False):
            sock.send_multipart(request, copy=False)
        replies = []
        for i, request in enumerate(frames):
            if not self._await(i, request, timeout_ms):
                raise CorralError(
                    f"parameter server {i} at {self.addresses[i]} did not answer within "
                    f"{timeout_ms / 1000:.0f} s (is it running, and does this process hold "
                    "the job's key?)"
                )
            header, arrays = unpack(self.socks[i].recv_multipart(copy=False))
            if "error" in header:
                raise CorralError(f"parameter server {i}: {header['error']}")
            replies.append((header, arrays))
        return replies

    def _values(
        self, replies: list[Any], layout: Layout, tables: Sequence[np.ndarray] = ()
    ) -> np.ndarray:
        """Assemble the dense values of all shards; write their table rows into `tables`."""
        # One output buffer for the client's life: a fresh model-sized array every step costs
        # more in page faults than the copy itself (measured: 1.3 s of a 4.5 s step at 100M).
        if self._out is None or self._out.size != layout.numel:
            self._out = np.empty(layout.numel, dtype=np.float32)
        out = self._out
        for i, (header, arrays) in enumerate(replies):
            self.versions[i] = header["version"]
            layout.shard(out, i)[:] = arrays[0]
            for t, table in enumerate(tables):
                layout.table_shard(table, t, i)[:] = arrays[1 + t]
        return out

    def init(
        self, values: np.ndarray, layout: Layout, tables: Sequence[np.ndarray] = ()
    ) -> np.ndarray:
        """Offer initial values; returns the ones the servers keep (the first worker's).

        Sparse `tables` (writable) are offered too and overwritten with the servers' rows.
        """
        requests = [
            (
                {"op": "init", "worker": self.worker},
                [
                    layout.shard(values, i),
                    *(layout.table_shard(t, n, i) for n, t in enumerate(tables)),
                ],
            )
            for i in range(layout.servers)
        ]
        self._exchange([({"op": "ping"}, [])] * layout.servers, self.handshake_ms)
        return self._values(self._exchange(requests), layout, tables)

    def step(
        self,
        gradient: np.ndarray,
        layout: Layout,
        rows: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    ) -> np.ndarray:
        """Push one gradient — dense, plus ``(row numbers, gradient rows)`` per sparse table —
        and return fresh dense values once the consistency model allows.

        The returned array is reused by the next call: copy it if you keep it.
        """
        self._steps += 1  # numbers the push, so a server never applies a resent one twice
        routed = [layout.route(t, r) for t, (r, _) in enumerate(rows)]
        requests = []
        for i in range(layout.servers):
            parts = [layout.shard(gradient, i)]
            for t, (r, v) in enumerate(rows):
                mine = routed[t][i]
                parts += [r[mine] - layout.rows[t][i], v[mine]]
            header = {
                "op": "step",
                "worker": self.worker,
                "version": self.versions[i],
                "seq": self._steps,
            }
            requests.append((header, parts))
        return self._values(self._exchange(requests), layout)

    def rows(self, layout: Layout, wanted: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The current values of rows `wanted[t]` of each sparse table `t`, in that order."""
        routed = [layout.route(t, r) for t, r in enumerate(wanted)]
        requests = [
            (
                {"op": "rows"},
                [wanted[t][routed[t][i]] - layout.rows[t][i] for t in range(len(wanted))],
            )
            for i in range(layout.servers)
        ]
        replies = self._exchange(requests)
        out = []
        for t, r in enumerate(wanted):
            rows = np.empty((len(r), replies[0][1][t].shape[1]), dtype=np.float32)
            for i, (_, arrays) in enumerate(replies):
                rows[routed[t][i]] = arrays[t]
            out.append(rows)
        return out

    def pull(self, layout: Layout, tables: Sequence[np.ndarray] = ()) -> np.ndarray:
        """The current values, without pushing anything (and all rows into `tables`)."""
        replies = self._exchange([({"op": "pull"}, [])] * layout.servers)
        return self._values(replies, layout, tables)

    def leave(self) -> None:
        """Tell every server this worker is done, so nobody waits for it."""
        self._exchange([({"op": "leave", "worker": self.worker}, [])] * len(self.socks))

    def begin_epoch(self, epoch: int, *, steps: int, samples: int) -> None:
        """Tell server 0 this worker's share of `epoch`, so a loss can be accounted for."""
        header = {"op": "epoch", "worker": self.worker, "epoch": epoch}
        self._exchange([(header | {"steps": steps, "samples": samples}, [])])

    def meet(self, epoch: int, sums: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Sum `sums` over `epoch`'s workers (waits for all); returns it and the next workers."""
        header = {"op": "meet", "worker": self.worker, "epoch": epoch}
        ((reply, arrays),) = self._exchange([(header, [sums])], timeout_ms=-1)
        return arrays[0].copy(), reply["members"]

    def join(self) -> dict[str, Any]:
        """Ask to join the running job: ``{epoch, members}``, or ``{finished: True}``."""
        ((reply, _),) = self._exchange([({"op": "join", "worker": self.worker}, [])], -1)
        return dict(reply)

    def lost(self, worker: int, successor: int | None) -> dict[str, Any]:
        """Report dead `worker` (and who replaces it) to every server; returns server 0's
        account of its unfinished work."""
        header = {"op": "lost", "worker": worker, "successor": successor}
        replies = self._exchange([(header, [])] * len(self.socks))
        return dict(replies[0][0])

    def stats(self) -> list[dict[str, Any]]:
        """Each server's staleness histogram, update count and bytes moved."""
        return [h for h, _ in self._exchange([({"op": "stats"}, [])] * len(self.socks))]

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self._zctx.term()
