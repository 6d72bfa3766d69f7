"""The consistency models' shared base, as pure decisions (no sockets, no tensors).

A server shard feeds every push to `Consistency.push` and gets back the `Update`s to apply
now; it asks `Consistency.may_reply` whether a worker's request for fresh parameters can
be answered yet. Everything a test needs to check the models — clocks, versions, the
staleness of every update — is plain data here. A worker's *clock* is the number of
gradients it has pushed.

One model per module, each citing its paper: `corral.ps.sync` (BSP), `corral.ps.ssp`
(stale-synchronous), `corral.ps.asynchronous` (ASP), `corral.ps.softsync` (n-softsync);
`corral.ps.settings.consistency_for` picks one from a job's settings.

Staleness of a gradient is the shard's version when it is applied minus the version the
worker computed it on. With ``lr_scaling="staleness"`` the learning rate of each update is
divided by its staleness (Zhang et al., "Staleness-aware Async-SGD", IJCAI 2016); for a
group of gradients averaged into one update, by the group's mean staleness.
`staleness_weight` is that rule and its relatives, public so that FedBuff
(`corral.strategies.fedbuff`) weighs its clients' stale updates by the same function.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

LrScaling = Literal["staleness"] | None

#: How much an update of staleness s counts (see `staleness_weight`).
StalenessRule = Literal["staleness", "inverse", "sqrt", "none"]


def staleness_weight(stale: float, rule: StalenessRule | None) -> float:
    """The factor on an update of staleness `stale` (a mean, for a group) under `rule`.

    ``"staleness"`` divides by the staleness as Zhang et al. do, 1/max(s, 1), so a fresh
    and a once-stale gradient count alike (the servers' ``lr_scaling="staleness"``);
    ``"inverse"`` is 1/(1 + s) and ``"sqrt"`` 1/√(1 + s), the polynomial rule of FedAsync
    (Xie et al., 2019) with exponents 1 and ½, the second FedBuff's (Nguyen et al., 2022);
    ``"none"`` or ``None`` counts every update fully.
    """
    if rule == "staleness":
        return 1.0 / max(stale, 1.0)
    if rule == "inverse":
        return 1.0 / (1.0 + stale)
    if rule == "sqrt":
        return 1.0 / (1.0 + stale) ** 0.5
    return 1.0


@dataclass(frozen=True)
class Update:
    """Apply ``lr * lr_scale`` times `gradient` (already averaged) to the shard."""

    gradient: Any
    lr_scale: float


def mean_of_arrays(gradients: list[Any]) -> Any:
    """The plain mean; gradients here are opaque, so a server may pass its own."""
    import numpy as np  # here: the job spec reads the settings' types without NumPy

    return np.mean(gradients, axis=0)


class Consistency(ABC):
    """The clock and version book-keeping of one shard; subclasses say when to update.

    An update happens in one of two ways, both here so their staleness accounting is one:
    at once for each gradient (`_apply_now`: async, ssp), or once a group of pending
    gradients is complete (`_apply_groups`: sync, softsync).
    """

    def __init__(
        self,
        workers: int,
        *,
        lr_scaling: LrScaling = None,
        average: Callable[[list[Any]], Any] = mean_of_arrays,
    ) -> None:
        self.lr_scaling, self.average = lr_scaling, average
        self.version = 0
        self.live = set(range(workers))
        self.clocks = dict.fromkeys(self.live, 0)
        self.histogram: Counter[int] = Counter()
        self._pending: list[tuple[Any, int]] = []

    def push(self, worker: int, gradient: Any, seen_version: int) -> list[Update]:
        """Record one gradient computed on `seen_version`; returns the updates to apply."""
        if worker not in self.live:
            self.join(worker)
        self.clocks[worker] += 1
        return self._updates(gradient, seen_version)

    @abstractmethod
    def _updates(self, gradient: Any, seen_version: int) -> list[Update]:
        """What one more gradient (its clock already counted) makes the shard apply."""

    def join(self, worker: int) -> None:
        """A worker joins a running job at the slowest live worker's clock.

        Joining at clock 0 would make every SSP worker wait for the newcomer to replay the
        whole job; at the slowest clock it is as stale as the slowest, no more.
        """
        self.clocks[worker] = min((self.clocks[w] for w in self.live), default=0)
        self.live.add(worker)

    def leave(self, worker: int) -> list[Update]:
        """A worker finished or died: stop waiting for it; returns updates that completes."""
        self.live.discard(worker)
        self.clocks.pop(worker, None)
        return []

    def may_reply(self, worker: int, clock: int) -> bool:
        """Whether a worker that pushed `clock` gradients may have parameters now."""
        return True

    def state(self) -> dict[str, Any]:
        """What a restarted shard restores (pending gradients are not kept)."""
        return {
            "version": self.version,
            "clocks": dict(self.clocks),
            "live": sorted(self.live),
            "histogram": dict(self.histogram),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.version, self.clocks = state["version"], dict(state["clocks"])
        self.live, self.histogram = set(state["live"]), Counter(state["histogram"])

    def _apply_now(self, gradient: Any, seen_version: int, weight: float) -> list[Update]:
        """One update of `weight` times the gradient, scaled by its staleness."""
        stale = self._note(seen_version)
        self.version += 1
        return [Update(gradient, weight * staleness_weight(stale, self.lr_scaling))]

    def _apply_groups(self, size: int) -> list[Update]:
        """One update per complete group of `size` pending gradients: their mean."""
        updates = []
        while self._pending and len(self._pending) >= max(size, 1):
            group, self._pending = self._pending[:size], self._pending[size:]
            stale = statistics.fmean([self._note(seen) for _, seen in group])
            mean = self.average([g for g, _ in group])
            self.version += 1
            updates.append(Update(mean, staleness_weight(stale, self.lr_scaling)))
        return updates

    def _note(self, seen_version: int) -> int:
        stale = max(self.version - seen_version, 0)
        self.histogram[stale] += 1
        return stale
