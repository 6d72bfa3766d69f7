"""How the clients' updates of one round become one: the weighted mean, or a robust rule.

A client's update is the change it made to the global model (its weights after local
training minus the weights it started from), flattened; a round's updates are the rows of
an ``(n, d)`` array. The mean weights each client by its samples (FedAvg). The robust
rules bound what a few faulty or malicious clients can do, at the price of gathering every
update rather than only their sum:

- `TrimmedMean` and `Median`: coordinate-wise, Yin et al., "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates" (ICML 2018).
- `Krum`: the update closest to its n − f − 2 nearest others, Blanchard et al., "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent" (NeurIPS 2017); with
  ``select > 1`` the mean of the `select` best (Multi-Krum).

The robust rules ignore sample counts: weighting by a count the client reports itself
would let one client claim the whole round.

Example:
    >>> updates = np.array([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [50.0, -50.0]])
    >>> Median().combine(updates, np.ones(4)).round(2).tolist()
    [1.1, 0.9]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import TrainingError

# numpy is imported where the math runs: the spec reads these configs without it
if TYPE_CHECKING:
    import numpy as np


class Aggregation(BaseModel, ABC):
    """Base of the aggregation rules; subclasses add a ``kind`` literal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    #: Whether the rule needs every update (else their weighted sum is enough, which is
    #: all a secure aggregation reveals).
    needs_each: ClassVar[bool] = True

    @abstractmethod
    def combine(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """One update of shape ``(d,)`` from `updates` ``(n, d)`` and their `weights` ``(n,)``."""

    def least_clients(self) -> int:
        """The fewest updates the rule is defined for."""
        return 1


class Mean(Aggregation):
    """The sample-weighted mean (FedAvg's rule)."""

    kind: Literal["mean"] = "mean"
    needs_each: ClassVar[bool] = False

    def combine(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return weighted_mean(updates.T @ weights, float(weights.sum()))


class TrimmedMean(Aggregation):
    """Per coordinate, the mean after dropping the `trim` fraction at each end.

    Attributes:
        trim: Fraction dropped at each end, below one half.
    """

    kind: Literal["trimmed_mean"] = "trimmed_mean"
    trim: float = Field(default=0.1, ge=0, lt=0.5)

    def combine(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        import numpy as np

        n = len(updates)
        cut = math.floor(self.trim * n)
        ordered = np.sort(updates, axis=0)
        return ordered[cut : n - cut].mean(axis=0)


class Median(Aggregation):
    """Per coordinate, the median."""

    kind: Literal["median"] = "median"

    def combine(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.median(updates, axis=0)


class Krum(Aggregation):
    """The update (or mean of the `select` updates) with the smallest Krum score.

    Attributes:
        byzantine: f, the faulty clients to tolerate; needs n > 2f + 2 updates.
        select: How many of the best-scored updates to average (1 is Krum).
    """

    kind: Literal["krum"] = "krum"
    byzantine: int = Field(default=1, ge=0)
    select: int = Field(default=1, ge=1)

    def least_clients(self) -> int:
        return max(2 * self.byzantine + 3, self.select)

    def combine(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        import numpy as np

        n = len(updates)
        if n < self.least_clients():
            raise TrainingError(
                f"krum with byzantine={self.byzantine} needs at least "
                f"{self.least_clients()} updates a round, this one had {n}"
            )
        squared = (updates * updates).sum(axis=1)
        distances = squared[:, None] + squared[None, :] - 2.0 * updates @ updates.T
        np.fill_diagonal(distances, np.inf)
        nearest = np.sort(distances, axis=1)[:, : n - self.byzantine - 2]
        best = np.argsort(nearest.sum(axis=1), kind="stable")[: self.select]
        return updates[best].mean(axis=0)


def weighted_mean(weighted_sum: np.ndarray, total_weight: float) -> np.ndarray:
    """The mean from a weighted sum and its total weight (a round with none is an error)."""
    if total_weight <= 0:
        raise TrainingError("no client reported an update this round")
    return weighted_sum / total_weight


#: The tagged union a federated strategy's ``aggregate`` field takes.
AnyAggregation = Annotated[Mean | TrimmedMean | Median | Krum, Field(discriminator="kind")]
