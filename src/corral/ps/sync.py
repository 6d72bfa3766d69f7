"""Bulk-synchronous parallel (BSP) on a parameter server.

The gradients of one round are averaged and applied once every live worker pushed; a
worker waits until its round is applied. This equals sequential SGD on the concatenated
batch (Valiant, "A Bridging Model for Parallel Computation", CACM 1990, for the model;
Li et al., "Scaling Distributed Machine Learning with the Parameter Server", OSDI 2014,
for its use on sharded servers).
"""

from __future__ import annotations

from typing import Any

from corral.ps.consistency import Consistency, Update


class BulkSynchronous(Consistency):
    """Apply the mean of each round once all live workers pushed; everyone waits for it."""

    def _updates(self, gradient: Any, seen_version: int) -> list[Update]:
        self._pending.append((gradient, seen_version))
        return self._apply_groups(len(self.live))

    def leave(self, worker: int) -> list[Update]:
        """Stop waiting for `worker`: the round it held up may now be complete."""
        super().leave(worker)
        return self._apply_groups(len(self.live))

    def may_reply(self, worker: int, clock: int) -> bool:
        return self.version >= clock
