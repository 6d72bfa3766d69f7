"""Consistency models of the parameter server, as pure decisions (no sockets, no tensors).

A server shard feeds every push to `Consistency.push` and gets back the `Update`s to apply
now; it asks `Consistency.may_reply` whether a worker's request for fresh parameters can
be answered yet. Everything a test needs to check the models — clocks, versions, the
staleness of every update — is plain data here.

Modes (a worker's *clock* is the number of gradients it has pushed):

* ``sync`` — bulk-synchronous (BSP): gradients of one round are averaged and applied once
  all live workers pushed; a worker waits for its round to be applied. Equals sequential
  SGD on the concatenated batch.
* ``ssp`` — stale-synchronous (Ho et al., "More Effective Distributed ML via a Stale
  Synchronous Parallel Parameter Server", NIPS 2013): each gradient is applied at once,
  weighted ``1/n`` so a full round weighs one step; a worker at clock ``c`` waits until the
  slowest live worker reached ``c - staleness``. ``staleness=0`` is lock-step, and for
  plain SGD the same maths as ``sync``.
* ``async`` — ASP: each gradient is applied at once as a full step; nobody waits.
* ``softsync`` — n-softsync (Gupta et al., "Model Accuracy and Runtime Tradeoff in
  Distributed Deep Learning", ICDM 2016): apply the mean of every ``quorum`` gradients as
  they arrive; nobody waits.

Staleness of a gradient is the shard's version when it is applied minus the version the
worker computed it on. With ``lr_scaling="staleness"`` the learning rate of each update is
divided by its staleness (Zhang et al., "Staleness-aware Async-SGD", IJCAI 2016); for a
``softsync`` group, by the group's mean staleness.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Mode = Literal["sync", "async", "ssp", "softsync"]


@dataclass(frozen=True)
class Update:
    """Apply ``lr * lr_scale`` times `gradient` (already averaged) to the shard."""

    gradient: Any
    lr_scale: float


def mean_of_arrays(gradients: list[Any]) -> Any:
    return np.mean(gradients, axis=0)


@dataclass
class Consistency:
    """The clock and version book-keeping of one shard under one consistency model."""

    mode: Mode
    workers: int
    staleness: int = 0
    quorum: int = 1
    lr_scaling: Literal["staleness"] | None = None
    #: How a group of gradients becomes one (sync, softsync); the server passes one that
    #: also averages sparse rows. Gradients are otherwise opaque here.
    average: Callable[[list[Any]], Any] = mean_of_arrays
    version: int = 0
    clocks: dict[int, int] = field(default_factory=dict)
    live: set[int] = field(default_factory=set)
    histogram: Counter[int] = field(default_factory=Counter)
    _pending: list[tuple[Any, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.live = set(range(self.workers))
        self.clocks = dict.fromkeys(self.live, 0)

    def push(self, worker: int, gradient: Any, seen_version: int) -> list[Update]:
        """Record one gradient computed on `seen_version`; returns the updates to apply."""
        if worker not in self.live:
            self.join(worker)
        self.clocks[worker] += 1
        if self.mode in ("async", "ssp"):
            stale = self._note(seen_version)
            weight = 1.0 / len(self.live) if self.mode == "ssp" else 1.0
            self.version += 1
            return [Update(gradient, weight * self._scale(stale))]
        self._pending.append((gradient, seen_version))
        return self._complete_groups()

    def join(self, worker: int) -> None:
        """A worker joins a running job at the slowest live worker's clock.

        Joining at clock 0 would make every SSP worker wait for the newcomer to replay the
        whole job; at the slowest clock it is as stale as the slowest, no more.
        """
        self.clocks[worker] = min((self.clocks[w] for w in self.live), default=0)
        self.live.add(worker)

    def leave(self, worker: int) -> list[Update]:
        """A worker finished or died: stop waiting for it (a sync round may now complete)."""
        self.live.discard(worker)
        self.clocks.pop(worker, None)
        return self._complete_groups() if self.mode == "sync" else []

    def may_reply(self, worker: int, clock: int) -> bool:
        """Whether a worker that pushed `clock` gradients may have parameters now."""
        if self.mode == "sync":
            return self.version >= clock
        if self.mode == "ssp":
            slowest = min((self.clocks[w] for w in self.live), default=clock)
            return slowest >= clock - self.staleness
        return True

    def _complete_groups(self) -> list[Update]:
        size = len(self.live) if self.mode == "sync" else self.quorum
        updates = []
        while self._pending and len(self._pending) >= max(size, 1):
            group, self._pending = self._pending[:size], self._pending[size:]
            stale = np.mean([self._note(seen) for _, seen in group])
            mean = self.average([g for g, _ in group])
            self.version += 1
            updates.append(Update(mean, self._scale(float(stale))))
        return updates

    def _note(self, seen_version: int) -> int:
        stale = max(self.version - seen_version, 0)
        self.histogram[stale] += 1
        return stale

    def _scale(self, stale: float) -> float:
        return 1.0 / max(stale, 1.0) if self.lr_scaling == "staleness" else 1.0
