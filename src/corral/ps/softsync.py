"""n-softsync on a parameter server: average every ``quorum`` gradients, nobody waits.

Gupta et al., "Model Accuracy and Runtime Tradeoff in Distributed Deep Learning: A
Systematic Study", ICDM 2016: the mean of every ``quorum`` gradients is applied as they
arrive, from whichever workers; with ``lr_scaling="staleness"`` the rate is divided by
the group's mean staleness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.ps.consistency import Consistency, LrScaling, Update, mean_of_arrays


class SoftSynchronous(Consistency):
    """Apply the mean of every `quorum` gradients as they arrive; a worker never waits."""

    def __init__(
        self,
        workers: int,
        *,
        quorum: int = 1,
        lr_scaling: LrScaling = None,
        average: Callable[[list[Any]], Any] = mean_of_arrays,
    ) -> None:
        super().__init__(workers, lr_scaling=lr_scaling, average=average)
        self.quorum = quorum

    def _updates(self, gradient: Any, seen_version: int) -> list[Update]:
        self._pending.append((gradient, seen_version))
        return self._apply_groups(self.quorum)
