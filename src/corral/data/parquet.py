"""Parquet files read in row groups, each rank reading only the row groups it owns.

A Parquet file is a sequence of row groups, the smallest unit that can be read alone. Each
epoch the row groups of all files are put in a seeded random order and laid end to end as
one index space; each rank takes its contiguous near-equal range of that space
(:func:`corral.data.sharding.rank_range`), reads the row groups that overlap it — the two at
its edges only partly used, shared with its neighbours — and shuffles its rows locally. A
rank therefore holds only its own part in memory, and every row is still seen once per epoch.

The shuffle is coarser than a global permutation (a rank's rows come from a run of row
groups), which is the usual price of streaming formats; smaller row groups make it finer.

Example:
    >>> source = ParquetSource("data/train/", features=["x1", "x2"], label="y")  # doctest: +SKIP
    >>> source.steps_per_epoch(world_size=4, batch_size=256)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corral.data import sharding
from corral.data.base import (
    Shard,
    Source,
    check_columns,
    check_finite,
    check_group_column,
    take_rows,
)
from corral.errors import DataError


class ParquetSource(Source):
    """A Parquet file, or a folder of them (searched recursively), as training data.

    Features are stacked into one ``float32`` matrix; an integer label becomes ``int64``,
    any other numeric label ``float32``. Null values count as NaN and are refused (in
    features, unless ``missing_features``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        label: str,
        features: Sequence[str] | None = None,
        missing_features: bool = False,
        groups: str | None = None,
    ) -> None:
        """Read only the files' metadata: schemas to validate columns, row counts to split.

        Args:
            path: A ``.parquet`` file, or a folder whose ``*.parquet`` files (at any depth,
                skipping names that start with ``_`` or ``.``, as Spark's ``_SUCCESS``) are
                read in sorted order.
            label: The label column.
            features: Feature columns, in order; ``None`` means every column but ``label``
                (and ``groups``).
            missing_features: Let null and NaN features through, as NaN (for a model that
                takes them as missing values, as XGBoost does); inf is still refused.
            groups: A column of group ids (any type), read whole by `groups`, never a
                feature: a federated simulation's clients.

        Raises:
            DataError: If the path is missing or holds no Parquet data, or a file lacks a
                column (the message lists those it has) or has a non-numeric one.
        """
        self._files = [str(f) for f in _parquet_files(Path(path))]
        metadata = [_read_metadata(f) for f in self._files]
        first_schema = metadata[0][0]
        self._label, self._missing_features, self._group = label, missing_features, groups
        self._features = (
            [c for c in first_schema.names if c not in (label, groups)]
            if features is None
            else list(features)
        )
        check_group_column(groups, self._features, label)
        blocks = []  # per row group: file index, index in file, rows, first row in file
        for i, (file, (schema, meta)) in enumerate(zip(self._files, metadata, strict=True)):
            if groups is not None:
                check_columns([groups], schema.names, file)
            _check_schema(schema, self._features, label, file)
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            starts = np.cumsum([0, *sizes])
            blocks += [(i, g, sizes[g], int(starts[g])) for g in range(len(sizes))]
        self._groups = np.array(blocks, dtype=np.int64).reshape(-1, 4)
        self._label_int = all(pa.types.is_integer(s.field(label).type) for s, _ in metadata)
        if self.num_samples == 0:
            raise DataError(f"the Parquet data at {path} is empty (0 rows)")

    @property
    def features(self) -> list[str]:
        """The feature columns, in the order of the matrix's columns."""
        return list(self._features)

    @property
    def num_samples(self) -> int:
        """Total rows over all files, from their metadata."""
        return int(self._groups[:, 2].sum())

    def groups(self) -> np.ndarray | None:
        """The group column of every file, in storage order (nulls as None or NaN)."""
        if self._group is None:
            return None
        parts = []
        for file in self._files:
            column = pq.read_table(file, columns=[self._group]).column(self._group)
            parts.append(column.to_numpy(zero_copy_only=False))
        return np.concatenate(parts)

    def _shard(self, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> Shard:
        """Read the row groups overlapping ``rank``'s range of this epoch's group order."""
        group_order = sharding.epoch_permutation(len(self._groups), seed, epoch, shuffle=shuffle)
        lo, hi = sharding.rank_range(self.num_samples, rank, world_size)
        x = np.empty((hi - lo, len(self._features)), dtype=np.float32)
        y = np.empty(hi - lo, dtype=np.int64 if self._label_int else np.float32)
        filled = 0
        with ExitStack() as stack:
            opened: dict[int, pq.ParquetFile] = {}
            for k, start, stop in sharding.block_slices(self._groups[group_order, 2], lo, hi):
                file, group, _, first_row = (int(v) for v in self._groups[group_order[k]])
                if file not in opened:
                    opened[file] = stack.enter_context(pq.ParquetFile(self._files[file]))
                table = opened[file].read_row_group(group, columns=[*self._features, self._label])
                part = slice(filled, filled + stop - start)
                self._convert(
                    table.slice(start, stop - start), x[part], y[part], file, first_row + start
                )
                filled = part.stop
        # A second stream, (seed, epoch, rank), so that ranks shuffle independently.
        rows = (
            np.random.default_rng((seed, epoch, rank)).permutation(len(x))
            if shuffle
            else np.arange(len(x))
        )
        return Shard(rows, partial(take_rows, x, y))

    def _convert(
        self, table: pa.Table, x: np.ndarray, y: np.ndarray, file: int, first_row: int
    ) -> None:
        """Fill ``x`` and ``y`` from ``table``, one column at a time; refuse NaN, inf, null
        (but NaN and null features, if missing features are allowed)."""
        where = self._files[file]
        for j, name in enumerate(self._features):
            x[:, j] = pc.cast(table.column(name), pa.float32(), safe=False).to_numpy()
        if not self._missing_features:
            check_finite(x, "features", self._features, first_row=first_row, file=where)
        elif np.isinf(x).any():  # the NaN are missing values: count only the inf
            inf = np.where(np.isnan(x), 0, x)
            check_finite(inf, "features", self._features, first_row=first_row, file=where)
        label = table.column(self._label)
        exact = y.dtype == np.int64 and label.null_count == 0
        values = pc.cast(label, pa.int64() if exact else pa.float32(), safe=False).to_numpy()
        check_finite(values, f"label {self._label!r}", first_row=first_row, file=where)
        y[:] = values


def _parquet_files(root: Path) -> list[Path]:
    """List the Parquet files at ``root``, skipping the ``_``/``.`` side files writers leave."""
    if not root.exists():
        raise DataError(f"no such file or folder: {root}")
    if root.is_file():
        return [root]
    files = sorted(
        p
        for p in root.rglob("*.parquet")
        if p.is_file() and not any(s.startswith(("_", ".")) for s in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"the folder {root} holds no .parquet files")
    return files


def _read_metadata(file: str) -> tuple[pa.Schema, pq.FileMetaData]:
    """Read a file's schema and row-group sizes without reading any data."""
    try:
        with pq.ParquetFile(file) as pf:
            return pf.schema_arrow, pf.metadata
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{file} cannot be read as Parquet: {err}") from err


def _check_schema(schema: pa.Schema, features: list[str], label: str, file: str) -> None:
    """Refuse missing or non-numeric columns, or no features at all, naming the file."""
    check_columns([*features, label], schema.names, file)
    if label in features:
        raise DataError(f"label {label!r} is also listed in features")
    if not features:
        raise DataError(f"{file} has no feature columns besides the label {label!r}")
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    bad = [c for c in [*features, label] if not any(t(schema.field(c).type) for t in numeric)]
    if bad:
        types = ", ".join(f"{c!r} ({schema.field(c).type})" for c in bad)
        raise DataError(f"column(s) {types} of {file} are not numeric; encode them first")
