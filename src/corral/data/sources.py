"""Sources for in-memory data and torch datasets, and :func:`as_source`, which picks one.

Example:
    >>> import numpy as np
    >>> as_source((np.random.rand(10, 3), np.arange(10))).steps_per_epoch(2, batch_size=2)
    3
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from corral.data.base import (
    Batch,
    IndexedSource,
    Source,
    check_columns,
    check_finite,
    check_group_column,
    quoted,
    take_rows,
)
from corral.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def _is_dataframe(obj: Any) -> bool:
    """True for a pandas DataFrame, without importing pandas in processes that never use it
    (workers fed arrays start ~0.6 s faster)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(obj, pandas.DataFrame)


def _numeric(a: np.ndarray, what: str) -> np.ndarray:
    """Cast to the dtype torch expects: integers to int64, floats and bools to float32."""
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind in "bf":
        return a.astype(np.float32, copy=False)
    raise DataError(f"{what} must be numeric, got dtype {a.dtype}")


class ArraySource(IndexedSource):
    """In-memory arrays ``x`` (one row per sample) and ``y`` (one label per sample).

    Floating and boolean features become ``float32`` (what models expect); integer features
    stay ``int64`` so that token or category ids can feed an embedding. Integer labels become
    ``int64`` (what ``cross_entropy`` expects); floating and boolean labels ``float32``.

    Example:
        >>> source = ArraySource(np.zeros((4, 2)), np.array([0, 1, 0, 1]))
        >>> source.num_samples
        4
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        *,
        feature_names: Sequence[str] | None = None,
        label_name: str | None = None,
        groups: Any = None,
    ) -> None:
        """Convert and validate the arrays once, so no worker meets bad data mid-training.

        Args:
            x: Features, anything ``np.asarray`` takes, shape ``(n, ...)``.
            y: Labels, shape ``(n,)`` or ``(n, k)``.
            feature_names: Names of ``x``'s columns (`features`, and error messages).
            label_name: Name of the label, used only in error messages.
            groups: Each sample's group id, shape ``(n,)``, of any type (a federated
                simulation's clients: `corral.federated.ClientColumn`); not a feature.

        Raises:
            DataError: On length mismatch, empty or non-numeric data, NaN or inf.
        """
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or y.ndim == 0:
            raise DataError("X and y must be arrays with one row per sample, not scalars")
        if len(x) != len(y):
            raise DataError(f"X has {len(x)} rows but y has {len(y)}")
        self._groups = None if groups is None else np.asarray(groups).reshape(-1)
        if self._groups is not None and len(self._groups) != len(x):
            raise DataError(f"X has {len(x)} rows but groups has {len(self._groups)}")
        self._features = None if feature_names is None else list(feature_names)
        if len(x) == 0:
            raise DataError("the data is empty (0 rows)")
        self._x = _numeric(x, "features")
        self._y = _numeric(y, "label")
        label = "label" if label_name is None else f"label {label_name!r}"
        check_finite(self._x, "features", feature_names)
        check_finite(self._y, label)

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        *,
        label: str,
        features: Sequence[str] | None = None,
        groups: str | None = None,
    ) -> ArraySource:
        """Take ``features`` and ``label`` columns of a DataFrame; features become ``float32``.

        Args:
            df: The table, one row per sample.
            label: The label column.
            features: Feature columns, in order; ``None`` means every column but ``label``
                (and ``groups``).
            groups: A column of group ids (any type) read as `groups`, never a feature.

        Raises:
            DataError: If columns are missing (the message lists those that exist), not
                numeric, or hold NaN, inf or missing values.
        """
        columns = list(df.columns)
        if features is None:
            features = [c for c in columns if c not in (label, groups)]
        features = list(features)
        check_columns(
            [*features, label, *([groups] if groups is not None else [])], columns, "the DataFrame"
        )
        check_group_column(groups, features, label)
        if label in features:
            raise DataError(f"label {label!r} is also listed in features")
        if not features:
            raise DataError(f"the DataFrame has no feature columns besides the label {label!r}")
        import pandas as pd

        not_numeric = [c for c in [*features, label] if not pd.api.types.is_numeric_dtype(df[c])]
        if not_numeric:
            raise DataError(f"column(s) {quoted(not_numeric)} are not numeric; encode them first")
        x = df[features].to_numpy(dtype=np.float32, na_value=np.nan)
        column = df[label]
        if pd.api.types.is_integer_dtype(column) and not column.isna().any():
            y = column.to_numpy(dtype=np.int64)
        else:
            y = column.to_numpy(dtype=np.float32, na_value=np.nan)
        ids = None
        if groups is not None:  # missing ids as NaN or None, which the partition refuses
            ids = df[groups].to_numpy()
            if df[groups].hasnans and pd.api.types.is_numeric_dtype(df[groups]):
                ids = df[groups].to_numpy(dtype=np.float64, na_value=np.nan)
        return cls(x, y, feature_names=[str(c) for c in features], label_name=label, groups=ids)

    @property
    def num_samples(self) -> int:
        """Number of rows."""
        return len(self._x)

    @property
    def features(self) -> list[str] | None:
        """The feature columns, in order, when the arrays came from named columns."""
        return None if self._features is None else list(self._features)

    def groups(self) -> np.ndarray | None:
        return self._groups

    def _take(self, idx: np.ndarray) -> Batch:
        return take_rows(self._x, self._y, idx)


class DatasetSource(IndexedSource):
    """A map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs.

    Items are fetched one by one and collated with ``default_collate``; ``float64`` tensors
    (what Python floats collate to) become ``float32`` so labels match a float32 model.
    """

    def __init__(self, dataset: Dataset) -> None:
        """Check that the dataset is map-style, non-empty, and that its first item is a pair.

        Raises:
            DataError: For an ``IterableDataset``, a dataset without ``__len__``, an empty
                one, or items that are not ``(x, y)`` pairs.
        """
        if isinstance(dataset, IterableDataset):
            raise DataError(
                "only map-style datasets (with __len__ and __getitem__) are supported, "
                "not IterableDataset"
            )
        if not hasattr(dataset, "__len__"):
            raise DataError(f"{_kind(dataset)} has no __len__; a map-style dataset needs one")
        if len(dataset) == 0:
            raise DataError("the dataset is empty (0 items)")
        self._dataset = dataset
        _check_pair(dataset[0], 0)

    @property
    def num_samples(self) -> int:
        """Length of the dataset."""
        return len(self._dataset)

    def _take(self, idx: np.ndarray) -> Batch:
        items = [_check_pair(self._dataset[i], i) for i in idx.tolist()]
        x, y = default_collate(items)
        return _float32(x), _float32(y)


def as_source(
    data: Any,
    *,
    features: Sequence[str] | None = None,
    label: str | None = None,
    groups: str | None = None,
) -> Source:
    """Turn whatever the user passed as training data into a :class:`Source`.

    Args:
        data: A ``Source`` (passed through); an ``(X, y)`` tuple or list of arrays; a pandas
            DataFrame; a path to a Parquet file or folder; or a map-style torch ``Dataset``.
        features: Feature columns of a DataFrame or Parquet data (``None``: all but label
            and ``groups``).
        label: Label column of a DataFrame or Parquet data; required for those.
        groups: A column of a DataFrame or Parquet data read as the source's `groups`
            (a federated simulation's client ids), never a feature. A ``Source`` passes
            through with the groups it carries.

    Raises:
        DataError: If ``data`` is of none of these kinds, or ``features``/``label``/
            ``groups`` are given for a kind that has no columns, or missing for one that has.

    Example:
        >>> as_source(pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}), label="y").num_samples
        2
    """
    if _is_dataframe(data) or isinstance(data, (str, os.PathLike)):
        if label is None:
            raise DataError("label= is required for DataFrames and Parquet data: name the column")
        if _is_dataframe(data):
            return ArraySource.from_dataframe(data, features=features, label=label, groups=groups)
        from corral.data.parquet import ParquetSource  # pyarrow only where Parquet is read

        return ParquetSource(data, features=features, label=label, groups=groups)
    if isinstance(data, Source) and features is None and label is None:
        return data
    if groups is not None:
        raise DataError(
            f"a client id column ({groups!r}) is read only from a DataFrame or Parquet data, "
            f"not from {_kind(data)}; pass ArraySource(x, y, groups=ids) instead"
        )
    if features is not None or label is not None:
        raise DataError(
            f"features= and label= apply only to DataFrames and Parquet data, not to {_kind(data)}"
        )
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DataError(f"a tuple or list of data must be (X, y), got {len(data)} items")
        return ArraySource(data[0], data[1])
    if isinstance(data, Dataset):
        return DatasetSource(data)
    raise DataError(
        f"cannot train on {_kind(data)}; pass a corral Source, an (X, y) pair of arrays, a pandas "
        "DataFrame, a path to Parquet data, or a map-style torch Dataset"
    )


def _check_pair(item: Any, index: int) -> Any:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"dataset item {index} is {_kind(item)}, not an (x, y) pair")
    return item


def _float32(t: Any) -> Any:
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t


def _kind(obj: Any) -> str:
    return f"a {type(obj).__name__}"
