"""Resource vectors of the job service: what a pool holds, a job asks for, a team may use.

The scheduler treats a pool — this machine, or the sum of a Spark cluster's executors — as
one vector of CPUs, memory and GPUs, and a job's demand as the sum over its roles of
``count × per-process resources`` (`total_demand`), because a job is admitted as a gang:
all of its processes or none. Packing processes onto the nodes of a cluster is the
engine's business; a job that fits the summed pool but not any node is the engine's to
refuse.

The vector itself, `Resources`, is the runtime's (`corral.runtime.resources`), shared with
the spec and the engines; this module adds what only the service needs: quotas, the
scheduler's plain-list arithmetic and the English of resource messages.

Hot loops of the scheduler keep vectors as plain lists in `DIMS` order, with the helpers
`fits`, `accumulate` and `deduct`, because creating a `Resources` per step costs more than
the step. The English helpers (`amount`, `number`, `amounts`) live here so that every
message about resources — a rejection at submit, a reason for waiting — reads the same.

"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corral.runtime.resources import DIMS, EPS, Resources

_LABELS = {"cpus": "CPUs", "memory_mib": "memory", "gpus": "GPUs"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Quota:
    """A team's hard caps; ``None`` leaves that resource uncapped (only the pool limits it)."""

    cpus: float | None = None
    memory_mib: int | None = None
    gpus: int | None = None

    def __post_init__(self) -> None:
        for dim in DIMS:
            cap = getattr(self, dim)
            if cap is not None and cap < 0:
                raise ValueError(f"Quota.{dim} must be >= 0 or None, not {cap}")

    def caps(self) -> tuple[float, float, float]:
        """The caps in `DIMS` order, with ``inf`` for uncapped resources."""
        inf = math.inf
        return (
            inf if self.cpus is None else self.cpus,
            inf if self.memory_mib is None else self.memory_mib,
            inf if self.gpus is None else self.gpus,
        )


def number(dim: str, value: float) -> str:
    """`value` of `dim` as a number with the unit only memory needs: ``"3"``, ``"16 GiB"``."""
    if dim == "memory_mib":
        if value >= 1024:
            return f"{value / 1024:.4g} GiB"
        return f"{value:.4g} MiB"
    return f"{value:g}"


def amount(dim: str, value: float) -> str:
    """`value` of `dim` in words: ``"12 CPUs"``, ``"1 GPU"``, ``"16 GiB of memory"``."""
    if dim == "memory_mib":
        return f"{number(dim, value)} of memory"
    label = _LABELS[dim] if value != 1 else _LABELS[dim][:-1]
    return f"{number(dim, value)} {label}"


def label(dim: str) -> str:
    """The name of `dim` in messages: ``"CPUs"``, ``"memory"``, ``"GPUs"``."""
    return _LABELS[dim]


def amounts(values: Sequence[float], dims: Iterable[int]) -> str:
    """The `dims` (indices into `DIMS`) of `values` in words: ``"12 CPUs and 2 GPUs"``."""
    return " and ".join(amount(DIMS[k], values[k]) for k in dims)


def fits(demand: Sequence[float], room: Sequence[float]) -> bool:
    """`Resources.fits_in` for plain vectors in `DIMS` order."""
    return demand[0] <= room[0] + EPS and demand[1] <= room[1] + EPS and demand[2] <= room[2] + EPS


def accumulate(total: list[float], demand: Resources) -> list[float]:
    """Add `demand` into the plain vector `total` in place; returns `total`."""
    total[0] += demand.cpus
    total[1] += demand.memory_mib
    total[2] += demand.gpus
    return total


def deduct(total: list[float], demand: Sequence[float]) -> None:
    """Subtract the plain vector `demand` from `total` in place."""
    for k in range(3):
        total[k] -= demand[k]
