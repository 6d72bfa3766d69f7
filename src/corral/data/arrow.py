"""Arrow columns as one float32 feature matrix, without a Python loop over rows.

A feature is a numeric column (one input) or a column of equal-length numeric arrays (a
Spark ``array<double>``, or an ML ``vector`` turned into one), which gives as many inputs
as its arrays hold. Both come out of Arrow as contiguous buffers: a list column's values
are one flat array, reshaped, so decoding costs one copy into float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from corral.errors import DataError


def _list_matrix(name: str, column: Any) -> np.ndarray:
    """A list column of equal-length arrays as an ``(rows, length)`` matrix."""
    if column.null_count:
        raise DataError(f"feature column {name} has {column.null_count} null array(s)")
    lengths = np.diff(np.asarray(column.offsets))
    width = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and lengths.min() != lengths.max():
        raise DataError(
            f"feature column {name} holds arrays of different lengths "
            f"({int(lengths.min())} to {int(lengths.max())}); every row needs the same"
        )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), width)


def feature_matrix(table: pa.Table | pa.RecordBatch, features: Sequence[str]) -> np.ndarray:
    """The `features` columns of `table` side by side, as float32, one row per row."""
    parts = []
    for name in features:
        column = table.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            parts.append(_list_matrix(name, column))
        else:
            parts.append(column.to_numpy(zero_copy_only=False).reshape(-1, 1))
    return np.hstack(parts).astype(np.float32, copy=False)


def label_vector(table: pa.Table | pa.RecordBatch, label: str) -> np.ndarray:
    """The `label` column: int64 class ids for an integer column, float32 targets else."""
    y = table.column(label).to_numpy(zero_copy_only=False)
    return y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(np.float32)
