"""Asynchronous parallel (ASP) on a parameter server: Hogwild-style, nobody waits.

Each gradient is applied at once as a full step, however stale (Recht et al., "Hogwild!:
A Lock-Free Approach to Parallelizing Stochastic Gradient Descent", NIPS 2011; Dean et
al., "Large Scale Distributed Deep Networks", NIPS 2012, on a parameter server). With
many workers it wants ``lr_scaling="staleness"`` (see `corral.ps.consistency`).
"""

from __future__ import annotations

from typing import Any

from corral.ps.consistency import Consistency, Update


class Asynchronous(Consistency):
    """Apply each gradient at once as a full step; a worker never waits."""

    def _updates(self, gradient: Any, seen_version: int) -> list[Update]:
        return self._apply_now(gradient, seen_version, 1.0)
