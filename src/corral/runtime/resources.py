"""One resource vocabulary for the spec, the engines and the service.

A process asks for `Resources`; a role's demand is ``count`` of them; a job's demand (what
the scheduler admits as a gang) is the sum over its roles (`total_demand`); a pool is the
same vector. CPUs are fractional because a pool's share of them is; memory is in MiB (0:
not stated), GPUs whole.

Example:
    >>> job = total_demand([(4, Resources(cpus=2, memory_mib=4096)), (1, Resources(cpus=1))])
    >>> job
    Resources(cpus=9, memory_mib=16384, gpus=0)
    >>> job.fits_in(Resources(cpus=8, memory_mib=65536, gpus=1))
    False
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The dimensions of a resource vector, in the order messages list them.
DIMS = ("cpus", "memory_mib", "gpus")
#: Tolerance of comparisons: CPUs are fractional, and sums of fractions drift.
EPS = 1e-9


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources:
    """An amount of CPUs, memory (MiB) and GPUs: a pool, a demand, or what is free.

    Keyword-only because three positional numbers of different units are easy to swap.
    Differences may go negative (an over-committed pool); `clamped` brings them back to 0.
    """

    cpus: float = 0
    memory_mib: int = 0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            cpus=self.cpus + other.cpus,
            memory_mib=self.memory_mib + other.memory_mib,
            gpus=self.gpus + other.gpus,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            cpus=self.cpus - other.cpus,
            memory_mib=self.memory_mib - other.memory_mib,
            gpus=self.gpus - other.gpus,
        )

    def __mul__(self, count: int) -> Resources:
        """``count`` processes of this size: how a role's demand is formed."""
        return Resources(
            cpus=self.cpus * count, memory_mib=self.memory_mib * count, gpus=self.gpus * count
        )

    __rmul__ = __mul__

    def fits_in(self, other: Resources) -> bool:
        """Whether this demand fits in `other` in every dimension at once."""
        return (
            self.cpus <= other.cpus + EPS
            and self.memory_mib <= other.memory_mib
            and self.gpus <= other.gpus
        )

    def clamped(self) -> Resources:
        """This vector with negative components set to 0."""
        return Resources(
            cpus=max(self.cpus, 0), memory_mib=max(self.memory_mib, 0), gpus=max(self.gpus, 0)
        )

    def dominant_share(self, pool: Resources) -> float:
        """The largest fraction of `pool` this vector takes in any dimension (DRF's measure).

        Dimensions the pool lacks entirely are left out: nobody can hold a share of them.
        """
        return max(
            (u / p for u, p in zip(self.as_tuple(), pool.as_tuple(), strict=True) if p > 0),
            default=0.0,
        )

    def as_tuple(self) -> tuple[float, float, float]:
        """The components in `DIMS` order, for loops that must not allocate objects."""
        return (self.cpus, self.memory_mib, self.gpus)


def total_demand(roles: Iterable[tuple[int, Resources]]) -> Resources:
    """A job's demand: the sum over its roles of ``count`` processes of the given size.

    Args:
        roles: ``(count, per-process resources)`` per role, e.g. workers and servers.
    """
    total = Resources()
    for count, each in roles:
        total = total + each * count
    return total


#: What a process asks for when nothing says otherwise: one CPU.
ONE_CPU = Resources(cpus=1)
