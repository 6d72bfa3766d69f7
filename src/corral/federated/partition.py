"""How a simulation splits one data set into clients: IID, label shards, Dirichlet, or
a column of client ids.

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
- `ClientColumn`: naturally federated data (one row per sample, with the user, device or
  hospital it came from): each distinct value of a column is one client, as LEAF's
  data sets are split (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018).

Each is a frozen config (a member of `AnyPartition`, written the same in Python and
YAML) whose `split` is a pure function of the labels (or the ids), the client count and the
seed, so
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

    def group_column(self) -> str | None:
        """The data column whose values `split` needs as its ``groups`` (never a
        feature); None: the labels are enough."""
        return None

    def split(
        self,
        labels: np.ndarray,
        *,
        clients: int,
        seed: int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Indices into `labels` of each client's samples; every sample goes to one client.

        `groups` are the values of `group_column` (one a sample), for the partitions that
        have one; the others ignore it.

        Raises:
            DataError: There are fewer samples than clients, or a client got none (or,
                for `ClientColumn`, the ids are missing or are not `clients` many).
        """
        import numpy as np

        if clients > len(labels):
            raise DataError(
                f"{clients} clients but only {len(labels)} samples: every client needs "
                "at least one; ask for fewer clients"
            )
        keys = self._keys(np.asarray(labels), groups, clients)
        parts = self._split(keys, clients, np.random.default_rng(seed))
        empty = sum(len(p) == 0 for p in parts)
        if empty:
            raise DataError(
                f"the {self.kind} partition left {empty} of {clients} clients with no "
                f"data; {self._remedy()}"
            )
        return parts

    def _keys(self, labels: np.ndarray, groups: np.ndarray | None, clients: int) -> np.ndarray:
        """What `_split` splits by: the labels, or (`ClientColumn`) the checked ids."""
        return labels

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


class ClientColumn(Partition):
    """Each distinct value of `column` is one client: client *k* holds the rows of the
    *k*-th value in sorted order, in the order they come in the data.

    The column is read beside the features and the label and is never a feature. The
    strategy's ``clients`` must be the number of distinct values (a mismatch is refused,
    naming both), so that ``fraction``, ``min_clients`` and privacy accounting are checked
    when the config is, before the data is read. The seed plays no part.

    Example:
        >>> ClientColumn(column="user").split(
        ...     np.zeros(4), clients=2, seed=0, groups=np.array(["b", "a", "b", "a"]))
        [array([1, 3]), array([0, 2])]

    Attributes:
        column: The column holding each sample's client id (any sortable values).
    """

    kind: Literal["column"] = "column"
    column: str = Field(min_length=1)

    def group_column(self) -> str | None:
        return self.column

    def _keys(self, labels: np.ndarray, groups: np.ndarray | None, clients: int) -> np.ndarray:
        """The ids, refused when absent, missing (NaN, None), of another length than the
        labels, or not `clients` distinct values."""
        import numpy as np

        where = f"client id column {self.column!r}"
        if groups is None:
            raise DataError(
                f"the column partition needs the {where}, and the training data carries "
                "none: pass a DataFrame or Parquet data with it (or an ArraySource with "
                "groups=)"
            )
        ids = np.asarray(groups)
        if len(ids) != len(labels):
            raise DataError(f"{where} has {len(ids)} values for {len(labels)} samples")
        missing = _missing(ids)
        if missing.any():
            raise DataError(
                f"{where} has {int(missing.sum())} missing (NaN/None) values, first at row "
                f"{int(np.argmax(missing))}; every sample needs a client"
            )
        try:
            distinct = len(np.unique(ids))
        except TypeError as err:  # ids of mixed types, which cannot be sorted
            raise DataError(f"{where} holds values that cannot be sorted: {err}") from err
        if distinct != clients:
            raise DataError(
                f"{where} has {distinct} distinct values but clients is {clients}; "
                f"set clients to {distinct}"
            )
        return ids

    def _split(self, ids: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        import numpy as np

        _, client, counts = np.unique(ids, return_inverse=True, return_counts=True)
        order = np.argsort(client.reshape(-1), kind="stable")
        return np.split(order, np.cumsum(counts)[:-1])


def _missing(ids: np.ndarray) -> np.ndarray:
    """Which ids are NaN or None (object arrays hold either)."""
    import numpy as np

    if ids.dtype.kind == "f":
        return np.isnan(ids)
    if ids.dtype.kind == "O":
        return np.array([v is None or v != v for v in ids.tolist()], dtype=bool)
    return np.zeros(len(ids), dtype=bool)


#: The tagged union a strategy's ``partition`` field takes.
AnyPartition = Annotated[IID | LabelShards | Dirichlet | ClientColumn, Field(discriminator="kind")]
