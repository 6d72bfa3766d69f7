"""The partitioners: every sample to one client, deterministic, honest about empty ones."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from pydantic import TypeAdapter

from corral.errors import DataError
from corral.federated import partition
from corral.federated.partition import IID, AnyPartition, ClientColumn, Dirichlet, LabelShards

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 classes


def _covers_once(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("split", [IID(), LabelShards(shards=2), Dirichlet(alpha=0.5)])
def test_every_sample_goes_to_exactly_one_client_and_the_seed_decides(split: AnyPartition) -> None:
    parts = split.split(LABELS, clients=30, seed=3)
    assert len(parts) == 30
    _covers_once(parts, len(LABELS))
    again = split.split(LABELS, clients=30, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split.split(LABELS, clients=30, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = {len(p) for p in IID().split(LABELS, clients=7, seed=0)}
    assert max(sizes) - min(sizes) <= 1


def test_two_label_shards_give_a_client_at_most_two_classes() -> None:
    parts = LabelShards(shards=2).split(LABELS, clients=30, seed=0)
    classes = [len(np.unique(LABELS[p])) for p in parts]
    assert max(classes) <= 2  # 60 shards of 10 samples, each within one class
    assert np.mean(classes) > 1.5  # most clients see two digits, as in McMahan et al.


def test_a_small_dirichlet_alpha_concentrates_classes() -> None:
    def mean_classes(alpha: float) -> float:
        parts = Dirichlet(alpha=alpha).split(LABELS, clients=10, seed=0)
        return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))

    assert mean_classes(0.1) < 5 < mean_classes(100.0)


def test_more_clients_than_samples_is_one_clear_line() -> None:
    with pytest.raises(DataError, match="601 clients but only 600 samples"):
        IID().split(LABELS, clients=601, seed=0)


def test_a_partition_that_leaves_a_client_empty_says_so() -> None:
    with pytest.raises(DataError, match=r"left \d+ of 500 clients with no data; raise alpha"):
        Dirichlet(alpha=0.01).split(LABELS, clients=500, seed=0)
    with pytest.raises(DataError, match="400 clients x 2 shards = 800 shards"):
        LabelShards().split(LABELS, clients=400, seed=0)


def test_configs_read_from_yaml_dicts() -> None:
    adapter: TypeAdapter[AnyPartition] = TypeAdapter(AnyPartition)
    assert adapter.validate_python({"kind": "shards", "shards": 3}) == LabelShards(shards=3)
    with pytest.raises(ValueError, match="alpha"):
        adapter.validate_python({"kind": "dirichlet", "alpha": 0})


def test_a_client_column_gives_each_id_its_rows_in_sorted_order_of_the_ids() -> None:
    ids = np.array(["carol", "al", "bo", "al", "carol", "al", "bo"], dtype=object)
    parts = ClientColumn(column="user").split(np.zeros(7), clients=3, seed=0, groups=ids)
    assert [p.tolist() for p in parts] == [[1, 3, 5], [2, 6], [0, 4]]  # al, bo, carol
    other_seed = ClientColumn(column="user").split(np.zeros(7), clients=3, seed=9, groups=ids)
    assert all(np.array_equal(a, b) for a, b in zip(parts, other_seed, strict=True))
    numbers = np.random.default_rng(0).integers(0, 40, size=600)
    parts = ClientColumn(column="device").split(LABELS, clients=40, seed=0, groups=numbers)
    _covers_once(parts, len(LABELS))
    assert [int(np.unique(numbers[p]).item()) for p in parts] == list(range(40))


def test_client_column_errors_are_one_line_each() -> None:
    split = ClientColumn(column="user")
    ids = np.array([1, 1, 2, 5])
    with pytest.raises(
        DataError, match="client id column 'user' has 3 distinct values but clients is 4; set "
    ):
        split.split(np.zeros(4), clients=4, seed=0, groups=ids)
    with pytest.raises(DataError, match=r"2 missing \(NaN/None\) values, first at row 1"):
        split.split(np.zeros(4), clients=2, seed=0, groups=np.array([1.0, np.nan, 2.0, np.nan]))
    with pytest.raises(DataError, match=r"1 missing \(NaN/None\) values, first at row 2"):
        split.split(np.zeros(3), clients=2, seed=0, groups=np.array(["a", "b", None]))
    with pytest.raises(DataError, match="needs the client id column 'user', and the training"):
        split.split(np.zeros(4), clients=3, seed=0)
    with pytest.raises(DataError, match="'user' has 4 values for 5 samples"):
        split.split(np.zeros(5), clients=3, seed=0, groups=ids)
    with pytest.raises(ValueError, match="column"):
        TypeAdapter(AnyPartition).validate_python({"kind": "column"})
    assert IID().split(LABELS, clients=3, seed=0, groups=ids)  # the others ignore groups


def test_the_docstring_example_holds() -> None:
    assert doctest.testmod(partition, extraglobs={"np": np}).failed == 0
