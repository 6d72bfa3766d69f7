"""The aggregation rules, on updates chosen so that each rule's answer is known."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from corral.errors import TrainingError
from corral.federated import aggregation
from corral.federated.aggregation import Krum, Mean, Median, TrimmedMean

RNG = np.random.default_rng(0)
HONEST = 1.0 + 0.01 * RNG.standard_normal((9, 5))
ATTACK = np.full((2, 5), 100.0)
UPDATES = np.vstack([HONEST, ATTACK])


def test_the_mean_weights_by_samples() -> None:
    got = Mean().combine(np.array([[0.0, 0.0], [3.0, 6.0]]), np.array([2.0, 1.0]))
    assert got.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("rule", [TrimmedMean(trim=0.2), Median(), Krum(byzantine=2)])
def test_robust_rules_ignore_two_attackers_the_mean_follows(rule: aggregation.Aggregation) -> None:
    weights = np.ones(len(UPDATES))
    assert np.abs(Mean().combine(UPDATES, weights) - 1.0).max() > 10
    assert np.abs(rule.combine(UPDATES, weights) - 1.0).max() < 0.05


def test_robust_rules_ignore_claimed_sample_counts() -> None:
    weights = np.array([1.0] * 9 + [1e6, 1e6])
    assert np.abs(Median().combine(UPDATES, weights) - 1.0).max() < 0.05


def test_multi_krum_averages_the_best_and_krum_picks_an_honest_update() -> None:
    one = Krum(byzantine=2).combine(UPDATES, np.ones(11))
    assert any(np.array_equal(one, row) for row in HONEST)
    several = Krum(byzantine=2, select=4).combine(UPDATES, np.ones(11))
    assert np.abs(several - 1.0).max() < 0.05


def test_krum_with_too_few_updates_says_how_many_it_needs() -> None:
    with pytest.raises(TrainingError, match="needs at least 7 updates a round, this one had 4"):
        Krum(byzantine=2).combine(UPDATES[:4], np.ones(4))


def test_trim_must_stay_below_one_half() -> None:
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(trim=0.5)


def test_the_docstring_example_holds() -> None:
    assert doctest.testmod(aggregation, extraglobs={"np": np}).failed == 0
