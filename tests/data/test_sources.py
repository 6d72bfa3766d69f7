"""Every source kind keeps the split rules; bad data fails at once with a readable DataError."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from corral.data import Source, as_source
from corral.data.parquet import ParquetSource
from corral.data.sources import ArraySource, DatasetSource
from corral.errors import DataError

ROW_GROUP = 7  # rows per Parquet row group in these tests


def frame(n: int) -> pd.DataFrame:
    """Column ``id`` names each sample; ``y = id % 3`` lets a test check x/y stay aligned."""
    ids = np.arange(n)
    return pd.DataFrame({"id": ids.astype(float), "a": ids * 0.5, "y": ids % 3})


class PairDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), i * 0.5], dtype=torch.float64), i % 3


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=ROW_GROUP)
    return path


def make_parquet_folder(df: pd.DataFrame, folder: Path) -> Path:
    """Two files of uneven size plus the side files Spark leaves, which must be skipped."""
    folder.mkdir()
    cut = len(df) // 3
    write_parquet(df.iloc[:cut], folder / "part-0.parquet")
    write_parquet(df.iloc[cut:], folder / "part-1.parquet")
    (folder / "_SUCCESS").touch()
    (folder / ".part-0.parquet.crc").touch()
    return folder


KINDS: dict[str, Callable[[int, Path], Source]] = {
    "array": lambda n, _: as_source((frame(n)[["id", "a"]].to_numpy(), np.arange(n) % 3)),
    "dataframe": lambda n, _: as_source(frame(n), label="y"),
    "parquet": lambda n, tmp: as_source(write_parquet(frame(n), tmp / f"{n}.parquet"), label="y"),
    "folder": lambda n, tmp: as_source(make_parquet_folder(frame(n), tmp / f"d{n}"), label="y"),
    "dataset": lambda n, _: as_source(PairDataset(n)),
}


def run_epoch(source: Source, w: int, b: int, **kw) -> list[list[tuple[torch.Tensor, ...]]]:
    return [
        list(source.batches(rank=r, world_size=w, batch_size=b, **{"epoch": 0, "seed": 0, **kw}))
        for r in range(w)
    ]


def ids(batches: list[tuple[torch.Tensor, ...]]) -> np.ndarray:
    return np.concatenate([x[:, 0].numpy() for x, _ in batches]).astype(int)


@pytest.mark.parametrize("kind", KINDS)
def test_each_sample_once_and_same_steps_everywhere(kind: str, tmp_path: Path) -> None:
    for n in (4, 23, 50):
        source = KINDS[kind](n, tmp_path)
        assert source.num_samples == n
        for w, b in itertools.product((1, 2, 3, 4), (2, 5, 16)):
            ranks = run_epoch(source, w, b)
            steps = source.steps_per_epoch(w, b)
            assert [len(batches) for batches in ranks] == [steps] * w, (n, w, b)
            for x, y in itertools.chain(*ranks):
                assert 1 <= len(x) <= b and len(x) == len(y)
                assert x.dtype == torch.float32 and y.dtype == torch.int64
                np.testing.assert_array_equal(x[:, 0].long() % 3, y)  # rows stay aligned
            seen = np.concatenate([ids(batches) for batches in ranks])
            np.testing.assert_array_equal(np.sort(seen), np.arange(n), err_msg=str((n, w, b)))


@pytest.mark.parametrize("kind", KINDS)
def test_shuffle_is_seeded_per_epoch(kind: str, tmp_path: Path) -> None:
    source = KINDS[kind](60, tmp_path)
    order = {
        (seed, epoch): ids(run_epoch(source, 2, 4, seed=seed, epoch=epoch)[0])
        for seed, epoch in [(0, 0), (0, 1), (1, 0)]
    }
    np.testing.assert_array_equal(order[0, 0], ids(run_epoch(source, 2, 4)[0]))
    assert not np.array_equal(order[0, 0], order[0, 1])
    assert not np.array_equal(order[0, 0], order[1, 0])
    in_order = np.concatenate([ids(b) for b in run_epoch(source, 3, 4, epoch=5, shuffle=False)])
    np.testing.assert_array_equal(in_order, np.arange(60))


@pytest.mark.parametrize("kind", KINDS)
def test_survives_cloudpickle(kind: str, tmp_path: Path) -> None:
    source = KINDS[kind](20, tmp_path)
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    np.testing.assert_array_equal(ids(run_epoch(copy, 2, 3)[1]), ids(run_epoch(source, 2, 3)[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_more_workers_than_samples_fails_at_the_call(kind: str, tmp_path: Path) -> None:
    source = KINDS[kind](3, tmp_path)
    message = r"^3 samples cannot be split across 4 workers$"
    with pytest.raises(DataError, match=message):
        source.steps_per_epoch(4, 2)
    with pytest.raises(DataError, match=message):
        source.batches(rank=0, world_size=4, epoch=0, seed=0, batch_size=2)  # no next() needed


def test_parquet_ranks_read_only_their_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, w = 100, 4  # 15 row groups of 7 rows (the last has 2), 25 rows per rank
    df = frame(n).assign(junk="text")  # a column nobody asked for, and unreadable as numbers
    source = ParquetSource(
        write_parquet(df, tmp_path / "f.parquet"), features=["id", "a"], label="y"
    )
    reads: list[tuple[int, tuple[str, ...]]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        reads.append((i, tuple(columns)))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    readers: dict[int, set[int]] = {}
    for epoch in (0, 1):
        for r in range(w):
            reads.clear()
            seen = ids(
                list(source.batches(rank=r, world_size=w, epoch=epoch, seed=3, batch_size=8))
            )
            groups = [g for g, _ in reads]
            assert sorted(groups) == sorted(set(seen // ROW_GROUP)), "read a group it did not use"
            assert len(groups) <= 25 // ROW_GROUP + 2
            assert {cols for _, cols in reads} == {("id", "a", "y")}
            for g in groups:
                readers.setdefault(g + 100 * epoch, set()).add(r)
    assert max(len(ranks) for ranks in readers.values()) <= 2  # edge groups are shared, no more


def test_parquet_reads_metadata_only_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_parquet(frame(30), tmp_path / "f.parquet")

    def refuse(*args, **kwargs):
        raise AssertionError("data was read at construction")

    for reader in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, reader, refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    assert ParquetSource(path, label="y").num_samples == 30


def test_parquet_nan_and_null_name_file_column_and_row(tmp_path: Path) -> None:
    df = frame(30)
    df.loc[17, "a"] = np.nan
    path = write_parquet(df, tmp_path / "bad.parquet")
    message = (
        r"^features contain 1 NaN/inf values \(first at row 17, column 'a'\) in .*bad\.parquet$"
    )
    with pytest.raises(DataError, match=message):
        as_source(path, label="y").batches(rank=0, world_size=1, epoch=0, seed=0, batch_size=8)
    labels = pa.table({"x": np.arange(10.0), "y": pa.array([0, 1, None] + [0] * 7)})
    pq.write_table(labels, tmp_path / "null.parquet")
    with pytest.raises(
        DataError, match=r"label 'y' contains 1 NaN/inf .*row 2\) in .*null\.parquet"
    ):
        source = ParquetSource(tmp_path / "null.parquet", label="y")
        source.batches(rank=0, world_size=1, epoch=0, seed=0, batch_size=4)


def test_parquet_errors(tmp_path: Path) -> None:
    path = write_parquet(frame(10).assign(name="x"), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"column\(s\) 'foo' not found; .*f\.parquet has: id, a, y"):
        ParquetSource(path, features=["id", "foo"], label="y")
    with pytest.raises(DataError, match=r"'name' \(.*string\) of .* are not numeric"):
        ParquetSource(path, label="y")
    with pytest.raises(DataError, match="no such file or folder"):
        as_source(tmp_path / "missing.parquet", label="y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.parquet files"):
        as_source(str(tmp_path / "empty"), label="y")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        ParquetSource(tmp_path / "fake.parquet", label="y")
    with pytest.raises(DataError, match="label= is required"):
        as_source(path)


def test_array_dtypes_and_shapes() -> None:
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    (xb, yb), *_ = ArraySource(x, np.linspace(0, 1, 6)).batches(
        rank=0, world_size=1, epoch=0, seed=0, batch_size=6
    )
    assert xb.dtype == torch.float32 and yb.dtype == torch.float32 and xb.shape == (6, 2)
    (xb, yb), *_ = ArraySource(x.astype(int), np.ones((6, 3), dtype=bool)).batches(
        rank=0, world_size=1, epoch=0, seed=0, batch_size=6
    )
    assert xb.dtype == torch.int64 and yb.dtype == torch.float32 and yb.shape == (6, 3)


def test_array_errors() -> None:
    with pytest.raises(DataError, match=r"^X has 100 rows but y has 99$"):
        as_source((np.zeros((100, 2)), np.zeros(99)))
    with pytest.raises(DataError, match="empty"):
        as_source((np.zeros((0, 2)), np.zeros(0)))
    x = np.zeros((30, 8))
    x[17, 5] = x[20, 1] = np.nan
    x[25, 0] = np.inf
    with pytest.raises(
        DataError, match=r"^features contain 3 NaN/inf values \(first at row 17, column 5\)$"
    ):
        as_source((x, np.zeros(30)))
    with pytest.raises(DataError, match=r"^label contains 1 NaN/inf values \(first at row 4\)$"):
        as_source((np.zeros((10, 2)), np.where(np.arange(10) == 4, np.nan, 0.0)))
    with pytest.raises(DataError, match="features must be numeric"):
        as_source((np.array([["a"], ["b"]]), np.zeros(2)))


def test_dataframe_features_and_errors() -> None:
    df = frame(10)
    (x, _), *_ = as_source(df, features=["a"], label="y").batches(
        rank=0, world_size=1, epoch=0, seed=0, batch_size=10, shuffle=False
    )
    np.testing.assert_allclose(x[:, 0].numpy(), df["a"].to_numpy())
    with pytest.raises(
        DataError, match=r"^column\(s\) 'foo' not found; the DataFrame has: id, a, y$"
    ):
        as_source(df, features=["a", "foo"], label="y")
    with pytest.raises(DataError, match=r"column\(s\) 'nope' not found"):
        as_source(df, label="nope")
    with pytest.raises(DataError, match="label 'y' is also listed in features"):
        as_source(df, features=["a", "y"], label="y")
    with pytest.raises(DataError, match=r"column\(s\) 's' are not numeric"):
        as_source(df.assign(s="x"), label="y")
    bad = df.astype({"a": "Float64"})
    bad.loc[3, "a"] = pd.NA
    with pytest.raises(DataError, match=r"1 NaN/inf values \(first at row 3, column 'a'\)"):
        as_source(bad, label="y")
    with pytest.raises(DataError, match=r"^label 'y' contains 1 NaN/inf values"):
        as_source(df.assign(y=df["y"].where(df.index != 6)), label="y")
    with pytest.raises(DataError, match="label= is required"):
        as_source(df)


class NotPairs(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(2)


class Stream(IterableDataset):
    def __iter__(self):
        yield from ()


def test_dataset_errors() -> None:
    with pytest.raises(DataError, match="only map-style datasets"):
        as_source(Stream())
    with pytest.raises(DataError, match=r"dataset item 0 is a Tensor, not an \(x, y\) pair"):
        DatasetSource(NotPairs())
    with pytest.raises(DataError, match="empty"):
        as_source(PairDataset(0))


def test_as_source_dispatch_errors() -> None:
    source = as_source(PairDataset(5))
    assert as_source(source) is source
    with pytest.raises(DataError, match=r"must be \(X, y\), got 3 items"):
        as_source((np.zeros(3), np.zeros(3), np.zeros(3)))
    with pytest.raises(DataError, match="cannot train on a dict; pass a corral Source"):
        as_source({"x": 1})
    with pytest.raises(DataError, match="features= and label= apply only to DataFrames"):
        as_source((np.zeros((3, 1)), np.zeros(3)), features=["a"])
    with pytest.raises(DataError, match="apply only to DataFrames and Parquet data, not to a Pair"):
        as_source(PairDataset(3), label="y")


@pytest.mark.parametrize("kind", ["dataframe", "folder"])
def test_a_group_column_is_read_beside_x_and_y_and_is_no_feature(kind: str, tmp_path: Path) -> None:
    df = frame(30).assign(user=[f"u{i % 4}" for i in range(30)])
    data = df if kind == "dataframe" else make_parquet_folder(df, tmp_path / "d")
    source = as_source(data, label="y", groups="user")
    x, y = source.arrays()
    assert x.shape == (30, 2) and source.features == ["id", "a"]  # type: ignore[attr-defined]
    assert np.array_equal(y, x[:, 0].astype(int) % 3)
    groups = source.groups()
    assert groups is not None and groups.tolist() == df["user"].tolist()  # storage order
    assert as_source(data, label="y", features=["a"]).groups() is None
    assert cloudpickle.loads(cloudpickle.dumps(source)).groups().tolist() == groups.tolist()


def test_group_column_errors(tmp_path: Path) -> None:
    df = frame(6).assign(user=[1, 1, 2, 2, 3, 3])
    path = write_parquet(df, tmp_path / "g.parquet")
    for data in (df, path):
        with pytest.raises(DataError, match=r"column\(s\) 'person' not found; .* has: id, a, y"):
            as_source(data, label="y", groups="person")
        with pytest.raises(DataError, match="'user' is the client id column and cannot also be"):
            as_source(data, label="y", features=["a", "user"], groups="user")
        with pytest.raises(DataError, match="'y' cannot be both the label and the client id"):
            as_source(data, label="y", groups="y")
    with pytest.raises(DataError, match=r"column \('user'\) is read only from a DataFrame or"):
        as_source((np.zeros((3, 2)), np.zeros(3)), groups="user")
    with pytest.raises(DataError, match="X has 3 rows but groups has 2"):
        ArraySource(np.zeros((3, 2)), np.zeros(3), groups=[1, 2])
    with_ids = ArraySource(np.zeros((3, 2)), np.zeros(3), groups=[7, 8, 7])
    assert as_source(with_ids, groups="user") is with_ids  # a Source keeps its own groups
    missing = as_source(df.assign(user=[1, None, 2, 2, 3, 3]), label="y", groups="user")
    assert np.isnan(missing.groups()[1])  # the partition refuses it, naming the column
