"""An edge aggregator: ``corral fl serve site.yaml --parent URL``.

Hierarchical aggregation, the multi-level structure of the documents corral grew from: a
site (a hospital, a region) runs an aggregator for its own clients, and that aggregator
is one client of the root. When the root sends a round's global weights, the edge runs
the round with its clients (its own job file says how many it samples, their local
epochs and its robust rule, if any) and sends up one update: its clients' combined
update, weighted by the samples they trained on. The root sees sites, never a client's
update, and its sample-weighted mean of the sites' means is the mean over all clients.

The edge keeps no model between rounds (each starts from the root's weights) and keeps
its keys, port and token in its folder, so a restarted edge listens on the same address;
its clients enrol again, and it enrols again at the root, which sees a client back. A
site that gets no update in its round sends none: the root's round closes without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from corral.comm import frames
from corral.errors import SpecError, TrainingError
from corral.federation.aggregator import Aggregator, round_sums
from corral.federation.client import PING_S, Refused, connect
from corral.federation.wire import JoinAddress
from corral.spec import Federation, JobSpec
from corral.strategies.fedavg import FedAvg

log = logging.getLogger("corral")


class Edge(Aggregator):
    """An aggregator whose rounds the root aggregator at `parent` starts; see the module
    docstring. The arguments are `Aggregator`'s, and `parent`, the root's address."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        base: Path,
        folder: Path,
        parent: JoinAddress,
        settings: Federation | None = None,
        grace: float = 5.0,
    ) -> None:
        if isinstance(spec.strategy, FedAvg) and spec.strategy.privacy is not None:
            raise SpecError(
                "strategy.privacy: an edge aggregator does not clip or noise; set privacy "
                "on the root, or serve this site's clients from the root directly"
            )
        if isinstance(spec.strategy, FedAvg) and spec.strategy.secure is not None:
            raise SpecError(
                "strategy.secure: secure aggregation at an edge is not built; serve this "
                "site's clients from the root to aggregate them securely"
            )
        super().__init__(spec, base=base, folder=folder, settings=settings, grace=grace)
        self.parent = parent
        self.start_round = 0  # the root counts rounds; an edge resumes nothing

    def run(self, on_round: Callable[[dict[str, Any]], None] = lambda row: None) -> list[dict]:
        """Enrol at the root once `min_clients` of this site's are in, then run each round
        it sends until it says the job is done; this site's rows, one a round."""
        context, up = connect(self.parent)
        try:
            self._await_clients(time.monotonic() + self.wait)
            up.send_multipart(frames.pack(self._site_hello()))
            poller = zmq.Poller()
            poller.register(up, zmq.POLLIN)
            poller.register(self.sock, zmq.POLLIN)
            heard = pinged = time.monotonic()
            while True:
                ready = dict(poller.poll(int(PING_S * 1000)))
                if self.sock in ready:  # this site's clients: pings, (re-)enrolments
                    self._serve(time.monotonic(), None)
                self._forget_silent()
                now = time.monotonic()
                if up not in ready:
                    if now - heard > self.wait:
                        raise TrainingError(
                            f"the root aggregator at {self.parent.endpoint} has not answered "
                            f"for {self.wait:.0f} s; is it running?"
                        )
                    if now - pinged >= PING_S:
                        up.send_multipart(frames.pack({"kind": "ping"}))
                        pinged = now
                    continue
                heard = now
                header, arrays = frames.unpack(up.recv_multipart())
                kind = header.get("kind")
                if kind == "refused":
                    raise Refused(f"refused by the root aggregator: {header.get('why')}")
                if kind == "who":
                    up.send_multipart(frames.pack(self._site_hello()))
                elif kind == "welcome":
                    log.info("site enrolled at the root %s", self.parent.endpoint)
                elif kind == "train" and arrays:
                    row, message = self._site_round(int(header["round"]), arrays[0])
                    if message is not None:
                        up.send_multipart(message)
                    self.history.append(row)
                    on_round(row)
                elif kind == "done":
                    break
            for identity in self.clients:
                self.sock.send_multipart([identity, *frames.pack({"kind": "done"})])
            return self.history
        finally:
            up.close(linger=200)
            context.term()
            self.sock.close(linger=200)
            self.context.term()

    def _site_hello(self) -> dict[str, Any]:
        """This site as one client of the root: its enrolled clients' samples."""
        return {
            "kind": "hello",
            "token": self.parent.token,
            "name": self.spec.name,
            "samples": sum(c.samples for c in self.clients.values()),
            "params": sum(p.numel() for p in self.local.params),
        }

    def _site_round(self, index: int, weights: Any) -> tuple[dict[str, Any], list[Any] | None]:
        """Round `index` of the root with this site's clients, from the root's weights:
        the site's row, and the update message for the root (None if none reported)."""
        start = time.monotonic()
        self.local.set_flat(torch.from_numpy(np.array(weights, dtype=np.float32)))
        per_round, _ = self._ready()
        sampled, reported = self._gather(index, per_round)
        row: dict[str, Any] = {"epoch": float(index + 1), **round_sums(reported)}
        row |= self._counts(sampled, reported, start)
        if not reported:
            row["round_failed"] = 1.0
            return row, None
        samples = [m["samples"] for _, m in reported]
        table = np.stack([u for u, _ in reported]).astype(np.float32)
        combined = self.config.aggregate.combine(table, np.asarray(samples, dtype=np.float64))
        header = {
            "kind": "update",
            "round": index,
            "samples": int(sum(samples)),
            "loss_sum": sum(m["loss_sum"] for _, m in reported),
            "correct": sum(m["correct"] for _, m in reported),
            "count": sum(m["count"] for _, m in reported),
            "classification": any(m["classification"] for _, m in reported),
            "compute_s": time.monotonic() - start,
        }
        return row, frames.pack(header, [np.ascontiguousarray(combined, dtype=np.float32)])
