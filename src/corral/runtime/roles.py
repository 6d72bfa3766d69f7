"""The roles of a plan: workers, and the processes a strategy adds beside them.

A strategy that needs helpers (parameter servers, say) returns `Role`s in its plan; the
launcher starts them with the workers, in the same plan of processes, and stops them
when the workers are done. A helper that dies fails the attempt like a worker would,
unless its role is `restartable`: then, while ``max_restarts`` allows, the launcher starts
it again with the same rank and `Context.restoring` set, and it restores its own state
(a parameter shard's checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.runtime.resources import ONE_CPU, Resources


@dataclass(frozen=True, kw_only=True)
class Role:
    """`count` processes named `name` ``0..count-1``, each running ``fn(*args)``.

    A plan's worker role leaves `fn` unset: what workers run (the training loop, or the
    user's function) is the launcher's caller's choice, not the plan's.
    """

    name: str
    count: int
    resources: Resources = ONE_CPU
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    restartable: bool = False
