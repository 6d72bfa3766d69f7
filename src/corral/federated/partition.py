"""How a simulation splits one data set into clients: IID, label shards, Dirichlet.

A federated algorithm is only as honestly tested as its clients are unlike each other, so
the partitioners are the ones the literature compares on:

- `IID`: a seeded permutation cut into near-equal parts (the easy case).
- `LabelShards`: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data" (AISTATS 2017), section 3: sort by label, cut into
  ``clients × shards`` equal shards, give each client `shards` of them at random. With 2
  shards per client most clients see two digits.
- `Dirichlet`: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification" (2019): each class is spread over the clients in
  proportions drawn from Dir(α); a small α gives each client few classes and unequal
  sizes.

Each is a frozen config (a member of `AnyPartition`, written the same in Python and
YAML) whose `split` is a pure function of the labels, the client count and the seed, so
every worker of a simulation computes the same clients without talking to the others.

Example:
    >>> parts = LabelShards(shards=2).split(np.repeat(np.arange(10), 10), clients=50, seed=0)
    >>> len(parts), sorted({len(np.unique(np.repeat(np.arange(10), 10)[p])) for p in parts})
    (50, [1, 2])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import DataError

# numpy is imported where the math runs: the spec reads these configs without it
if TYPE_CHECKING:
    import numpy as np

#: Draws of Dir(α) proportions tried before a client that got no sample is an error.
DIRICHLET_TRIES = 10


class Partition(BaseModel, ABC):
    """Base of the partitioner configs; subclasses add a ``kind`` literal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str

    def split(self, labels: np.ndarray, *, clients: int, seed: int) -> list[np.ndarray]:
        """Indices into `labels` of each client's samples; every sample goes to one client.

        Raises:
            DataError: There are fewer samples than clients, or a client got none.
        """
        import numpy as np

        if clients > len(labels):
            raise DataError(
                f"{clients} clients but only {len(labels)} samples: every client needs "
                "at least one; ask for fewer clients"
            )
        parts = self._split(np.asarray(labels), clients, np.random.default_rng(seed))
        empty = sum(len(p) == 0 for p in parts)
        if empty:
            raise DataError(
                f"the {self.kind} partition left {empty} of {clients} clients with no "
                f"data; {self._remedy()}"
            )
        return parts

    @abstractmethod
    def _split(
        self, labels: np.ndarray, clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """The parts, possibly with empty ones (`split` refuses those)."""

    def _remedy(self) -> str:
        return "ask for fewer clients"


class IID(Partition):
    """Every client gets a near-equal random share (sizes differ by at most one)."""

    kind: Literal["iid"] = "iid"

    def _split(
        self, labels: np.ndarray, clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        import numpy as np

        return list(np.array_split(rng.permutation(len(labels)), clients))


class LabelShards(Partition):
    """McMahan et al.'s pathological non-IID split: `shards` label-sorted shards a client.

    Attributes:
        shards: Shards per client (the paper uses 2).
    """

    kind: Literal["shards"] = "shards"
    shards: int = Field(default=2, ge=1)

    def _split(
        self, labels: np.ndarray, clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        import numpy as np

        total = clients * self.shards
        if total > len(labels):
            raise DataError(
                f"{clients} clients x {self.shards} shards = {total} shards but only "
                f"{len(labels)} samples; ask for fewer clients or shards"
            )
        # stable sort, ties broken by a seeded permutation: same labels, different samples
        order = rng.permutation(len(labels))
        by_label = order[np.argsort(labels[order], kind="stable")]
        pieces = np.array_split(by_label, total)
        dealt = rng.permutation(total).reshape(clients, self.shards)
        return [np.concatenate([pieces[s] for s in row]) for row in dealt]


class Dirichlet(Partition):
    """Each class spread over the clients by proportions drawn from Dir(`alpha`).

    A draw that leaves a client empty is drawn again (up to `DIRICHLET_TRIES` times, from
    the same seeded generator, so the result is still deterministic).

    Attributes:
        alpha: Concentration: 100 is near IID, 0.1 gives most clients one or two classes.
    """

    kind: Literal["dirichlet"] = "dirichlet"
    alpha: float = Field(gt=0)

    def _split(
        self, labels: np.ndarray, clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        import numpy as np

        classes = np.unique(labels)
        for _ in range(DIRICHLET_TRIES):
            parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
            for value in classes:
                members = rng.permutation(np.flatnonzero(labels == value))
                shares = rng.dirichlet(np.full(clients, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for client, piece in enumerate(np.split(members, cuts)):
                    parts[client].append(piece)
            joined = [np.concatenate(p) for p in parts]
            if all(len(p) for p in joined):
                return joined
        return joined

    def _remedy(self) -> str:
        return f"raise alpha (now {self.alpha}) or ask for fewer clients"


#: The tagged union a strategy's ``partition`` field takes.
AnyPartition = Annotated[IID | LabelShards | Dirichlet, Field(discriminator="kind")]
