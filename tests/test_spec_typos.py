"""An unknown field in a spec names the known field it is closest to, at its own place."""

from __future__ import annotations

import pytest

from corral.errors import SpecError
from corral.spec import JobSpec, RoleSpec, parse

BASE = {"entrypoint": "model:make", "data": {"path": "train.parquet", "label": "y"}}


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ({"epoch": 3}, "epoch: unknown field; did you mean 'epochs'?"),
        (
            {"roles": {"worker": {"cpu": 2}}},
            "roles.worker.cpu: unknown field; did you mean 'cpus'?",
        ),
        # an optional model (roles.server), and a strategy: the member its kind names
        (
            {"roles": {"server": {"cnt": 1}}},
            "roles.server.cnt: unknown field; did you mean 'count'?",
        ),
        (
            {"strategy": {"kind": "averaging", "evry": 4}},
            "strategy.evry: unknown field; did you mean 'every'?",
        ),
        ({"spark": {"buffer": 8}}, "spark.buffer: unknown field; did you mean 'buffer_mb'?"),
    ],
)
def test_a_typo_names_the_field_meant(extra, line):
    with pytest.raises(SpecError) as info:
        parse(JobSpec, BASE | extra)
    assert f"  {line}" in str(info.value).splitlines()


def test_a_field_like_none_gets_no_guess():
    with pytest.raises(SpecError) as info:
        parse(JobSpec, BASE | {"colour": "blue"})
    assert "  colour: unknown field" in str(info.value).splitlines()


def test_the_guess_comes_from_the_model_parsed():
    # a RoleSpec alone: its own fields, not those of a whole job (which has `seed`)
    with pytest.raises(SpecError, match=r"seeds: unknown field$"):
        parse(RoleSpec, {"memory": "1g", "seeds": 1}, source="--memory")
    with pytest.raises(SpecError, match="seeds: unknown field; did you mean 'seed'"):
        parse(JobSpec, BASE | {"seeds": 1})
