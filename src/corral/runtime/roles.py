"""Processes a strategy adds beside the workers (parameter servers, say).

A strategy that needs helpers returns `Role`s from ``prepare_job``; the launcher starts
them with the workers, in the same plan, and stops them when the workers are done. A
helper that dies fails the attempt like a worker would, unless its role is `restartable`:
then, while ``max_restarts`` allows, the launcher starts it again with the same rank and
``CORRAL_RESTORE=1``, and it restores its own state (a parameter shard's checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.engines.base import Resources


@dataclass(frozen=True, kw_only=True)
class Role:
    """`count` processes named `name` ``0..count-1``, each running ``fn(*args)``."""

    name: str
    count: int
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    resources: Resources = field(default_factory=Resources)
    restartable: bool = False
