"""Search spaces: which fields of a job spec a search varies, and over what values.

A space maps a spec field, by its dotted path as the YAML writes it (``optimizer.lr``,
``roles.worker.count``, ``strategy.kind``), to a range or a list of choices. The same
mapping is the YAML file of ``corral tune --space``, the Python argument of
`corral.tune` and the REST body's ``space``:

    optimizer.lr: {low: 0.001, high: 0.3, log: true}
    batch_size: {low: 16, high: 128, step: 16}
    optimizer.name: {choices: [sgd, adam]}
    optimizer.momentum: {low: 0.0, high: 0.95, when: {optimizer.name: sgd}}

A range of two ints is an int range; ``when`` makes a parameter conditional on earlier
ones. `Space.check` applies every bound and choice to the job spec and validates it, so
a space that names no field, or a value the field refuses, fails before any trial runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, RootModel, model_validator

from corral.classic import check as check_kind
from corral.errors import SpecError
from corral.spec import JobSpec, _Model, parse, parse_job

if TYPE_CHECKING:
    import optuna

#: The most values a range may expand to for grid search.
GRID_LIMIT = 1000


class Param(_Model):
    """One parameter: ``low``/``high`` (with ``log`` or ``step``), or ``choices``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample the range on a log scale")
    step: float | None = Field(None, gt=0, description="the range's values are low + k·step")
    choices: list[Any] | None = Field(None, min_length=1)
    when: dict[str, Any] = Field(
        default_factory=dict, description="sample only where these earlier parameters are so"
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_type(cls, data: Any) -> Any:
        """Bounds written as ints make an int range, so the type is read before pydantic
        turns them into floats."""
        if isinstance(data, dict) and data.get("type") is None:
            bounds = [data.get(k) for k in ("low", "high", "step") if data.get(k) is not None]
            ints = bool(bounds) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in bounds
            )
            kind = "categorical" if "choices" in data else "int" if ints else "float"
            data = {**data, "type": kind}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        if (self.choices is not None) != (self.type == "categorical"):
            raise ValueError("a categorical parameter takes choices; a range takes low and high")
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("give choices, or low and high, not both")
            if self.log:
                raise ValueError("log applies to a range, not to choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high, or choices")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"empty range: low {self.low:g} is not below high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must be above 0, not from {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self

    @property
    def extremes(self) -> list[Any]:
        """The values `Space.check` tries: both bounds, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def grid(self, path: str) -> list[Any]:
        """Every value of the parameter, for grid search."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            raise SpecError(f"space.{path}: grid search needs choices, or a step for a range")
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        if count > GRID_LIMIT:
            raise SpecError(f"space.{path}: {count} grid values; at most {GRID_LIMIT}")
        values = [self.low + k * step for k in range(count)]
        return [int(v) for v in values] if self.type == "int" else values

    def suggest(self, trial: optuna.Trial, path: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(path, self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(path, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(path, self.low, self.high, step=self.step, log=self.log)


class Space(RootModel[dict[str, Param]]):
    """The parameters of a search by spec path, in the order they are sampled."""

    @model_validator(mode="after")
    def _conditions_name_earlier_parameters(self) -> Space:
        if not self.root:
            raise ValueError("the space is empty: name at least one spec field to vary")
        seen: list[str] = []
        for path, param in self.root.items():
            for other in param.when:
                if other not in seen:
                    raise ValueError(
                        f"{path}.when: '{other}' is not a parameter listed before '{path}'"
                    )
            seen.append(path)
        return self

    @classmethod
    def of(cls, value: Space | Mapping[str, Any]) -> Space:
        """Validate a mapping (YAML, Python, REST) into a space; `SpecError` if bad."""
        if isinstance(value, Space):
            return value
        return parse(cls, dict(value), source="space")

    def active(self, path: str, values: Mapping[str, Any]) -> bool:
        """Whether `path` is sampled, given the values sampled before it."""
        return all(values.get(k) == v for k, v in self.root[path].when.items())

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """One trial's values, by path (a conditional parameter only where it applies)."""
        values: dict[str, Any] = {}
        for path, param in self.root.items():
            if self.active(path, values):
                values[path] = param.suggest(trial, path)
        return values

    def grid(self) -> dict[str, list[Any]]:
        """Every parameter's values, for Optuna's grid sampler (no conditions)."""
        conditional = [p for p, param in self.root.items() if param.when]
        if conditional:
            raise SpecError(f"space.{conditional[0]}: grid search takes no 'when' conditions")
        return {path: param.grid(path) for path, param in self.root.items()}

    def check(self, spec: Mapping[str, Any]) -> None:
        """Apply every bound and every choice (with the values its conditions name) to
        `spec` and validate the result as a job, so that a path naming no field, or a
        value its field refuses, is an error now rather than a failed trial.

        Raises:
            SpecError: naming the parameter and the spec's own complaint.
        """
        for path, param in self.root.items():
            for value in param.extremes:
                values = {**param.when, path: value}
                try:
                    job = parse_job(apply(spec, values), source="job")
                    if not isinstance(job, JobSpec):  # its params, by the library's names
                        check_kind(job, base=Path.cwd())
                except SpecError as exc:
                    why = str(exc).split("\n", 1)[-1].strip()
                    raise SpecError(f"space.{path} = {value!r}: {why}") from None


def apply(spec: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the spec mapping with each dotted path set to its value. A field given
    as a name (``strategy: ps``) stands for ``{kind: ps}`` when a path goes into it."""
    out = _copy(spec)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            child = node.get(key)
            if isinstance(child, str):
                child = {"kind": child}
            elif not isinstance(child, dict):
                child = {}
            node[key] = child
            node = child
        node[leaf] = value
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
