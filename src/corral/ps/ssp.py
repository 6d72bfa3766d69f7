"""Stale-synchronous parallel (SSP) on a parameter server.

Ho et al., "More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server", NIPS 2013: each gradient is applied at once, weighted ``1/n`` so a full round
weighs one step; a worker at clock ``c`` waits until the slowest live worker reached
``c - staleness``. ``staleness=0`` is lock-step, and for plain SGD the same maths as BSP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.ps.consistency import Consistency, LrScaling, Update, mean_of_arrays


class StaleSynchronous(Consistency):
    """Apply each gradient at once at ``1/n``; hold a worker `staleness` clocks ahead."""

    def __init__(
        self,
        workers: int,
        *,
        staleness: int = 0,
        lr_scaling: LrScaling = None,
        average: Callable[[list[Any]], Any] = mean_of_arrays,
    ) -> None:
        super().__init__(workers, lr_scaling=lr_scaling, average=average)
        self.staleness = staleness

    def _updates(self, gradient: Any, seen_version: int) -> list[Update]:
        return self._apply_now(gradient, seen_version, 1.0 / len(self.live))

    def may_reply(self, worker: int, clock: int) -> bool:
        slowest = min((self.clocks[w] for w in self.live), default=clock)
        return slowest >= clock - self.staleness
