"""Search spaces: what they sample, how they apply to a spec, and the one-line errors a
bad space gets before any trial runs."""

from __future__ import annotations

import optuna
import pytest

from corral.errors import SpecError
from corral.search.space import Space, apply

JOB = {"entrypoint": "m:f", "data": {"path": "x", "label": "y"}, "epochs": 3}


def test_types_are_read_from_the_bounds():
    space = Space.of(
        {
            "optimizer.lr": {"low": 0.001, "high": 0.3, "log": True},
            "batch_size": {"low": 16, "high": 128, "step": 16},
            "optimizer.name": {"choices": ["sgd", "adam"]},
            "optimizer.momentum": {"low": 0, "high": 1, "type": "float"},
        }
    )
    kinds = {path: param.type for path, param in space.root.items()}
    assert kinds == {
        "optimizer.lr": "float",
        "batch_size": "int",
        "optimizer.name": "categorical",
        "optimizer.momentum": "float",
    }
    # the same space after a round trip through JSON (the REST body, the database)
    again = Space.of(space.model_dump(mode="json"))
    assert {p: v.type for p, v in again.root.items()} == kinds


def test_conditional_parameters_are_sampled_only_where_they_apply():
    space = Space.of(
        {
            "optimizer.name": {"choices": ["sgd", "adam"]},
            "optimizer.momentum": {"low": 0.0, "high": 0.9, "when": {"optimizer.name": "sgd"}},
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {"sgd": 0, "adam": 0}
    for _ in range(30):
        values = space.suggest(study.ask())
        seen[values["optimizer.name"]] += 1
        assert ("optimizer.momentum" in values) == (values["optimizer.name"] == "sgd")
    assert seen["sgd"] and seen["adam"]


def test_apply_sets_nested_paths_and_expands_a_named_strategy():
    spec = {**JOB, "strategy": "gossip"}
    out = apply(spec, {"strategy.peers": 2, "optimizer.lr": 0.1})
    assert out["strategy"] == {"kind": "gossip", "peers": 2}
    assert out["optimizer"] == {"lr": 0.1}
    assert spec["strategy"] == "gossip"  # the search's own spec is left as it was


def test_grid_values():
    space = Space.of({"batch_size": {"low": 16, "high": 64, "step": 16}, "x": {"choices": [1]}})
    assert space.grid() == {"batch_size": [16, 32, 48, 64], "x": [1]}
    with pytest.raises(SpecError, match="grid search needs choices, or a step"):
        Space.of({"optimizer.lr": {"low": 0.1, "high": 1.0}}).grid()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "the space is empty"),
        ({"optimizer.lr": {"low": 0.1, "high": 0.01}}, "empty range: low 0.1 is not below high"),
        ({"optimizer.lr": {"low": 0.0, "high": 1.0, "log": True}}, "a log range must be above 0"),
        ({"optimizer.lr": {"low": 0.1}}, "give low and high, or choices"),
        ({"optimizer.lr": {"choices": []}}, "at least 1 item"),
        ({"a": {"low": 1, "high": 2, "when": {"b": 1}}}, "'b' is not a parameter listed before"),
    ],
)
def test_bad_spaces_are_one_line_errors(space, message):
    with pytest.raises(SpecError, match=message):
        Space.of(space)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optimizer.lrr": {"low": 0.1, "high": 1.0}}, "unknown field; did you mean 'lr'"),
        ({"epochs": {"low": 0, "high": 3}}, r"space.epochs = 0: epochs: .*greater than or equal"),
        ({"optimizer.name": {"choices": ["sgd", "lion"]}}, r"space.optimizer.name = 'lion'"),
    ],
)
def test_a_space_the_job_refuses_fails_before_any_trial(space, message):
    with pytest.raises(SpecError, match=message):
        Space.of(space).check(JOB)
