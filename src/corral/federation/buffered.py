"""Buffered asynchronous aggregation with real clients: a FedBuff job served.

The simulation (`corral.strategies.fedbuff`) decides who finishes when from a seeded
event model; here time is real. The aggregator keeps `concurrency` enrolled clients
training at once, each from the global weights current when it was sent work, marked
with that version. An update that arrives joins the buffer with its staleness (the
server steps since its version); when `buffer` are in, the server steps by
Σ nᵢ·w(sᵢ)·Δᵢ / Σ nᵢ (w: `corral.ps.consistency.staleness_weight`, the rule the
parameter server and the simulation use; not renormalised, so a stale buffer moves the
model less) through the strategy's ``server_step``, and the freed client gets new work
from the new version. A slow client holds up nobody: the others keep the steps coming,
and its update counts for less when it arrives.

One row (and one checkpoint) per server step, as a round of FedAvg. A client that is
sent work and stays silent past ``round_timeout`` frees its slot. Updates staler than
``max_staleness`` are dropped and counted. After a restart the aggregator resumes at its
last step; work sent before it is lost with the clients' enrolment, never counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corral.comm import frames
from corral.errors import TrainingError
from corral.federation.aggregator import Aggregator, round_sums
from corral.ps.consistency import staleness_weight
from corral.spec import Federation, JobSpec
from corral.strategies.fedbuff import FedBuff

log = logging.getLogger("corral")


class BufferedAggregator(Aggregator):
    """Serves a `FedBuff` job to real clients; see the module docstring. The arguments
    are `Aggregator`'s."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        base: Path,
        folder: Path,
        settings: Federation | None = None,
        grace: float = 5.0,
    ) -> None:
        super().__init__(spec, base=base, folder=folder, settings=settings, grace=grace)
        assert isinstance(self.config, FedBuff)
        self.buffered: FedBuff = self.config
        self.version = self.start_round
        #: client → (the version it was sent, when)
        self.in_flight: dict[bytes, tuple[int, float]] = {}
        self.buffer: list[tuple[np.ndarray, dict[str, Any], int]] = []
        self.dropped_stale = 0
        self._sent = 0  # how much work was handed out: seeds the choice of clients

    def run(self, on_round: Callable[[dict[str, Any]], None] = lambda row: None) -> list[dict]:
        """Serve server steps until the job's epochs are done; one row a step."""
        try:
            self._await_clients(time.monotonic() + self.wait)
            began = time.monotonic()
            while self.version < self.spec.epochs:
                if not self.clients:
                    self._await_clients(time.monotonic() + self.wait)
                self._refill()
                self._serve(time.monotonic() + 1.0, None)
                self._expire()
                if len(self.buffer) >= self.buffered.buffer:
                    row = self._step(began)
                    self.version += 1
                    self.history.append(row)
                    self._checkpoint(self.version)
                    on_round(row)
                    began = time.monotonic()
            for identity in self.clients:
                self.sock.send_multipart([identity, *frames.pack({"kind": "done"})])
            return self.history
        finally:
            self.sock.close(linger=200)
            self.context.term()

    def _refill(self) -> None:
        """Send the current weights to idle clients until `concurrency` are training."""
        wanted = (self.buffered.concurrency or self.buffered.per_round) - len(self.in_flight)
        idle = [c for c in sorted(self.clients) if c not in self.in_flight]
        if wanted <= 0 or not idle:
            return
        rng = np.random.default_rng([self.spec.seed, self.version, self._sent])
        chosen = [idle[i] for i in rng.choice(len(idle), min(wanted, len(idle)), replace=False)]
        weights = self.local.flat().numpy()
        message = frames.pack({"kind": "train", "round": self.version}, [weights])
        for identity in chosen:
            self.sock.send_multipart([identity, *message])
            self.in_flight[identity] = (self.version, time.monotonic())
            self.clients[identity].round = self.version  # busy: silence is not absence
            self._sent += 1

    def _take(
        self, identity: bytes, header: dict[str, Any], arrays: list[Any], current: Any
    ) -> None:
        """An update from a client sent work: into the buffer with its staleness."""
        sent = self.in_flight.get(identity)
        if header.get("kind") != "update" or sent is None or header.get("round") != sent[0]:
            return
        del self.in_flight[identity]
        self.clients[identity].round = None
        stale = self.version - sent[0]
        limit = self.buffered.max_staleness
        if limit is not None and stale > limit:
            self.dropped_stale += 1
            return
        self.buffer.append((np.array(arrays[0]), header, stale))

    def _expire(self) -> None:
        """Free the slots of clients silent past ``round_timeout`` since sent work."""
        now = time.monotonic()
        for identity, (_, sent) in list(self.in_flight.items()):
            if now - sent > self.round_timeout:
                del self.in_flight[identity]
                if identity in self.clients:
                    log.info("client %s sent no update in time", self.clients[identity].name)
                    self.clients[identity].round = None

    def _step(self, began: float) -> dict[str, Any]:
        """One server step from the first `buffer` updates in; its row."""
        k = self.buffered.buffer
        taken, self.buffer = self.buffer[:k], self.buffer[k:]
        table = np.stack([u for u, _, _ in taken]).astype(np.float64)
        samples = np.array([h["samples"] for _, h, _ in taken], dtype=np.float64)
        stale = [s for _, _, s in taken]
        weight = np.array([staleness_weight(s, self.buffered.staleness) for s in stale])
        if not samples.sum():
            raise TrainingError("the buffered updates report no samples")
        mean = (samples * weight) @ table / samples.sum()
        start = self.local.flat()
        aggregate = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))
        self.local.set_flat(self.config.server_step(self.server_state, start, aggregate))
        reported = [(u, h) for u, h, _ in taken]
        row: dict[str, Any] = {"epoch": float(self.version + 1), **round_sums(reported)}
        row.update(self._evaluate())
        elapsed = time.monotonic() - began
        row |= {
            "clients": float(k),
            "clients_reported": float(k),
            "clients_dropped": 0.0,
            "clients_enrolled": float(len(self.clients)),
            "client_compute_s": sum(h["compute_s"] for _, h in reported) / k,
            "updates_per_s": k / elapsed if elapsed > 0 else float("inf"),
            "staleness_mean": float(np.mean(stale)),
            "staleness_max": float(max(stale)),
            "dropped_stale": float(self.dropped_stale),
            "time_s": elapsed,
        }
        self.dropped_stale = 0
        return row
