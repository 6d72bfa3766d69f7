"""The job model: one pydantic description of a job for Python, YAML and REST.

`TrainSettings` holds everything about *how* to train that is plain data (workers and
their resources, strategy, epochs, checkpoints, restarts); `Trainer` validates its keyword
arguments through it. `JobSpec` adds what a YAML file must name because it cannot hold
Python objects: the entrypoint (a model factory), the data, the loss and the optimizer.
A bad value fails here, before anything starts, as a `SpecError` naming the field path and
the allowed values.

`TrainSettings.plan` composes the spec's roles with the strategy's own plan into one
`JobPlan`: every process by role with its resources, and the demand the scheduler counts.
`Trainer`, ``corral train`` and the service all read that one plan.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from corral.errors import SpecError
from corral.runtime.resources import Resources, total_demand
from corral.runtime.roles import Role
from corral.strategies import AllReduce, AnyStrategy, FedAvg, Strategy, StrategyPlan

# torch is imported where an optimizer or loss is made: a spec is read and checked without
# it, so ``corral train bad.yaml`` reports its error in a fraction of a second.
if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "m": 1,
    "mb": 1,
    "mi": 1,
    "mib": 1,
    "g": 1024,
    "gb": 1024,
    "gi": 1024,
    "gib": 1024,
    "t": 1024**2,
    "tb": 1024**2,
}


#: The strategy classes YAML and REST can name by their ``kind``.
_UNION = typing.get_args(typing.get_args(AnyStrategy)[0])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleSpec(_Model):
    """How many processes of one role, and the resources of each."""

    count: int = Field(1, ge=1, description="how many processes of this role")
    cpus: int = Field(1, ge=1, description="CPU threads each process may use")
    gpus: int = Field(0, ge=0, description="GPUs each process gets exclusively")
    memory: int | None = Field(None, ge=1, description="MiB each process needs; '4g' works")

    @field_validator("memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"'{value}' is not a size; write MiB as a number, or e.g. 512m, 4g")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])

    @property
    def resources(self) -> Resources:
        """What each process of the role asks for, in the runtime's vocabulary."""
        return Resources(cpus=self.cpus, memory_mib=self.memory or 0, gpus=self.gpus)


class Roles(_Model):
    """The processes a job runs, by role."""

    worker: RoleSpec = Field(default_factory=RoleSpec)
    server: RoleSpec | None = Field(None, description="parameter servers (strategy 'ps')")


class MLflow(_Model):
    """Track the job in MLflow: the spec as params, tags, every epoch's metrics (step =
    epoch), the progress reports as per-step metrics, and the spec, the last checkpoint
    and the model as artifacts. See `corral.train.tracking`.

    Example:
        >>> corral.Trainer(..., tracking=corral.MLflow(experiment="digits"))
    """

    kind: Literal["mlflow"] = "mlflow"
    uri: str | None = Field(
        None,
        description="tracking URI; default MLFLOW_TRACKING_URI, else MLflow's own local "
        "store in the working directory",
    )
    experiment: str = Field("corral", min_length=1, description="experiment of the run")
    run_name: str | None = Field(None, description="the run's name; default MLflow's")
    run_id: str | None = Field(
        None, description="continue this run (its epochs already logged are not repeated)"
    )
    parent_run_id: str | None = Field(
        None, description="a child of this run (a search's trial is a child of the search)"
    )
    step_metrics: bool = Field(
        True, description="also log the progress reports (about two a second) per step"
    )
    log_model: bool = Field(True, description="log the trained model (mlflow.pytorch)")


#: A job's tracking: ``"mlflow"`` stands for MLflow with its defaults.
Tracking = Annotated[
    MLflow | None, BeforeValidator(lambda v: {"kind": v} if isinstance(v, str) else v)
]


class CheckpointSpec(_Model):
    """When and where checkpoints are written."""

    every: int = Field(1, ge=1, description="write a checkpoint every this many epochs")
    dir: Path | None = Field(None, description="default: ./corral-runs/<name>-<time>")
    keep: int = Field(3, ge=1, description="how many recent checkpoints to keep")


class DataSpec(_Model):
    """A Parquet file or folder, with the columns to train on."""

    path: str
    features: list[str] | None = Field(None, description="default: every column but the label")
    label: str


class Federation(_Model):
    """Real clients train this job (``corral fl join``): its process is their aggregator.

    Without it a federated strategy simulates its clients in the job's workers. With it,
    ``corral fl serve job.yaml`` (or the service, for a submitted job) listens here and
    shows the join address, which holds the job's enrolment token, to its team only.
    """

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(0, ge=0, le=65535, description="0: a free port, kept across restarts")
    round_timeout: float = Field(60.0, gt=0, description="seconds a round waits for updates")
    wait: float = Field(600.0, gt=0, description="seconds to wait for min_clients to enrol")


class SparkSpec(_Model):
    """Where a job with ``engine: spark`` runs. Under spark-submit the session already
    exists and these only fill in what it lacks."""

    master: str = Field("local[*]", description="e.g. local[4], spark://host:7077, yarn")
    conf: dict[str, str] = Field(default_factory=dict, description="Spark configuration")
    buffer_mb: float = Field(
        64.0, gt=0, description="most MiB of its partition a worker holds in memory at once"
    )


class OptimizerSpec(_Model):
    """An optimizer by name; also callable on parameters, so Trainer accepts it directly."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)

    def __call__(self, params: Any) -> torch.optim.Optimizer:
        import torch

        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)


def _torch_loss(cls: str, **kwargs: Any) -> torch.nn.Module:
    """``torch.nn.<cls>(**kwargs)``, looked up only when a loss is made."""
    import torch

    module: torch.nn.Module = getattr(torch.nn, cls)(**kwargs)
    return module


#: Losses a YAML job can name, each a factory of its torch module (``LOSSES["mse"]()``);
#: anything else must be a ``module:attribute`` reference.
LOSSES: dict[str, Callable[..., torch.nn.Module]] = {
    "cross_entropy": functools.partial(_torch_loss, "CrossEntropyLoss"),
    "nll": functools.partial(_torch_loss, "NLLLoss"),
    "mse": functools.partial(_torch_loss, "MSELoss"),
    "l1": functools.partial(_torch_loss, "L1Loss"),
    "bce_with_logits": functools.partial(_torch_loss, "BCEWithLogitsLoss"),
}


class TrainSettings(_Model):
    """How to train: everything but the model, loss, optimizer and data themselves."""

    roles: Roles = Field(default_factory=Roles)
    strategy: AnyStrategy = Field(default_factory=AllReduce)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1, description="samples per worker per step, at most")
    seed: int = 0
    shuffle: bool = True
    max_restarts: int = Field(0, ge=0)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resume_from: Path | None = None
    master_port: int | None = Field(None, ge=1, le=65535)
    tracking: Tracking = Field(None, description="experiment tracking (MLflow)")

    @field_validator("strategy", mode="wrap")
    @classmethod
    def _strategy(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A name stands for its defaults; a `Strategy` of a class outside the union (one
        the user wrote, see README "Writing a strategy") is taken as it is — it validated
        itself when it was built. YAML and REST name the strategies of the union."""
        if isinstance(value, Strategy) and not isinstance(value, _UNION):
            return value
        return handler({"kind": value} if isinstance(value, str) else value)

    @model_validator(mode="after")
    def _roles_match_the_plan(self) -> TrainSettings:
        """A helper role the spec sizes must be one the strategy plans, with its count."""
        server = self.roles.server
        if server is None:
            return self
        planned = {r.name: r for r in self.plan().strategy.helpers}
        if "server" not in planned:
            raise ValueError(f"roles.server: the {self.strategy.kind} strategy runs no servers")
        count = planned["server"].count
        if "count" in server.model_fields_set and server.count != count:
            raise ValueError(
                f"roles.server.count: {server.count} differs from the {count} "
                "servers the strategy runs"
            )
        return self

    def plan(self) -> JobPlan:
        """Every process this job runs, by role, with fresh secrets for one launch."""
        workers = self.roles.worker
        helpers = self.roles.server.resources if self.roles.server else Resources(cpus=1)
        strategy = self.strategy.plan(workers=workers.count, helpers=helpers)
        return JobPlan(
            workers=Role(name="worker", count=workers.count, resources=workers.resources),
            strategy=strategy,
        )


@dataclass(frozen=True, kw_only=True)
class JobPlan:
    """The processes of one launch of a job: its workers and the strategy's helpers.

    Attributes:
        workers: The worker role (its entry point is the launcher's to set).
        strategy: The strategy's plan: helpers, secrets, its caller-side supervisor.
    """

    workers: Role
    strategy: StrategyPlan

    @property
    def roles(self) -> tuple[Role, ...]:
        return (self.workers, *self.strategy.helpers)

    @property
    def demand(self) -> Resources:
        """What the scheduler admits as a gang: every process of every role at once."""
        return total_demand((r.count, r.resources) for r in self.roles)


class JobSpec(TrainSettings):
    """A whole training job, as written in YAML for ``corral train job.yaml``.

    Example:
        >>> spec = load_spec("job.yaml")
        >>> spec.roles.worker.count
        4
    """

    kind: Literal["torch"] = Field("torch", description="the job kind: a PyTorch model")
    name: str = Field("job", pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    entrypoint: str = Field(description="model factory: 'package.module:fn' or 'file.py:fn'")
    engine: Literal["local", "spark"] = "local"
    spark: SparkSpec = Field(default_factory=SparkSpec)
    data: DataSpec
    validation: DataSpec | None = None
    loss: str = "cross_entropy"
    optimizer: OptimizerSpec | str = Field(
        default_factory=OptimizerSpec,
        description="by name with its settings, or a 'module:attribute' reference to a "
        "function of the parameters",
    )
    federation: Federation | None = Field(
        None, description="real clients join this job; without it they are simulated"
    )

    @model_validator(mode="after")
    def _served_to_real_clients(self) -> JobSpec:
        if self.federation is None:
            return self
        if not isinstance(self.strategy, FedAvg):
            raise ValueError(
                f"federation: real clients train a federated strategy (fedavg, fedprox, "
                f"fedadam…), not {self.strategy.kind}"
            )
        return self

    def plan(self) -> JobPlan:
        """As `TrainSettings.plan`; a job served to real clients runs one process, the
        aggregator, whatever its worker count (the clients bring their own machines)."""
        if self.federation is None:
            return super().plan()
        aggregator = self.roles.worker.resources
        return JobPlan(
            workers=Role(name="worker", count=1, resources=aggregator),
            strategy=StrategyPlan(),
        )

    @field_validator("entrypoint", "loss", "optimizer")
    @classmethod
    def _reference(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str) or (info.field_name == "loss" and value in LOSSES):
            return value
        if not re.fullmatch(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_.]*", value):
            allowed = ", ".join(LOSSES) + ", or " if info.field_name == "loss" else ""
            raise ValueError(f"'{value}' is not {allowed}a 'module:attribute' reference")
        return value


class ClassicRoles(_Model):
    """A classic job's processes: its workers (XGBoost or LightGBM ranks, or the parallel
    fits of a scikit-learn search)."""

    worker: RoleSpec = Field(default_factory=RoleSpec)


class _ClassicJob(_Model):
    """What every classic-ML kind shares with the PyTorch one: a name, the data, where it
    runs, its workers, restarts and tracking. `params` go to the library as they are;
    `corral.classic` checks their names against the library's before anything starts."""

    name: str = Field("job", pattern=r"^[A-Za-z0-9_.-]+$", max_length=128)
    engine: Literal["local", "spark"] = "local"
    spark: SparkSpec = Field(default_factory=SparkSpec)
    data: DataSpec
    validation: DataSpec | None = None
    roles: ClassicRoles = Field(default_factory=ClassicRoles)
    seed: int = 0
    max_restarts: int = Field(0, ge=0)
    tracking: Tracking = Field(None, description="experiment tracking (MLflow)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the library's own parameters, e.g. max_depth"
    )

    def plan(self) -> JobPlan:
        """Its workers; no helpers (the libraries' trackers run in the driver)."""
        workers = self.roles.worker
        return JobPlan(
            workers=Role(name="worker", count=workers.count, resources=workers.resources),
            strategy=StrategyPlan(),
        )

    @property
    def epochs(self) -> int:
        """The reports the job makes, one per boosting round (or one, for a search): what
        a pruner counts in."""
        return 1


class _Boosting(_ClassicJob):
    task: Literal["classification", "regression"] = "classification"
    rounds: int = Field(100, ge=1, description="boosting rounds (trees per class)")
    early_stopping: int | None = Field(
        None,
        ge=1,
        description="stop when the validation metric has not improved for this many rounds",
    )

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> _Boosting:
        if self.early_stopping is not None and self.validation is None:
            raise ValueError("early_stopping: needs a validation set to watch; add validation")
        return self

    @property
    def epochs(self) -> int:
        return self.rounds


class XGBoostSpec(_Boosting):
    """Gradient-boosted trees with XGBoost: on Spark, ``xgboost.spark`` in a barrier stage
    of ``roles.worker.count`` tasks; locally, one process with that many threads."""

    kind: Literal["xgboost"]


class LightGBMSpec(_Boosting):
    """Gradient-boosted trees with LightGBM's own distributed training, its workers as
    corral runs torch workers (see `corral.classic.lightgbm`)."""

    kind: Literal["lightgbm"]


class Distribution(_Model):
    """A range a randomized search draws from: uniform, log-uniform, or integers."""

    low: float
    high: float
    log: bool = False
    type: Literal["float", "int"] = "float"

    @model_validator(mode="after")
    def _ordered(self) -> Distribution:
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SklearnSearch(_Model):
    """A cross-validated search over the estimator's parameters (GridSearchCV or
    RandomizedSearchCV), its fits spread over the job's workers."""

    kind: Literal["grid", "random"] = "grid"
    space: dict[str, list[Any] | Distribution] = Field(min_length=1)
    cv: int = Field(3, ge=2, description="folds")
    scoring: str | None = Field(None, description="scikit-learn scorer; default the model's")
    n_iter: int = Field(10, ge=1, description="candidates a random search draws")
    seed: int = 0

    @model_validator(mode="after")
    def _grid_takes_lists(self) -> SklearnSearch:
        for name, values in self.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"space.{name}: an empty list of values")
            if self.kind == "grid" and isinstance(values, Distribution):
                raise ValueError(f"space.{name}: a grid search takes a list of values")
        return self


class SklearnSpec(_ClassicJob):
    """A scikit-learn estimator, optionally searched with cross-validation; on Spark the
    fits are Spark tasks (joblib-spark), locally they are processes (joblib's loky)."""

    kind: Literal["sklearn"]
    estimator: str = Field(description="'sklearn.ensemble:RandomForestClassifier', or yours")
    search: SklearnSearch | None = None

    @field_validator("estimator")
    @classmethod
    def _reference(cls, value: str) -> str:
        if not re.fullmatch(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_.]*", value):
            raise ValueError(f"'{value}' is not a 'module:attribute' reference")
        return value


#: Every job kind's spec by its ``kind``; a spec that names none is a PyTorch job.
KINDS: dict[str, type[_Model]] = {
    "torch": JobSpec,
    "xgboost": XGBoostSpec,
    "lightgbm": LightGBMSpec,
    "sklearn": SklearnSpec,
}
#: A job of any kind, as `parse_job` and `load_spec` return it.
AnyJobSpec = JobSpec | XGBoostSpec | LightGBMSpec | SklearnSpec
#: The classic-ML kinds (`corral.classic` runs them).
ClassicSpec = XGBoostSpec | LightGBMSpec | SklearnSpec


def _describe(error: Any, model: type[BaseModel]) -> str:
    """One problem of pydantic's report in the spec's own words; an unknown field names
    the closest known one at its place in `model`, since a typo (``epoch`` for ``epochs``)
    is the usual cause."""
    loc = list(error["loc"])
    if len(loc) > 2 and loc[0] == "strategy":
        del loc[1]  # pydantic puts the union's tag in the path: strategy.allreduce.x
    if len(loc) > 2 and loc[0] == "optimizer" and loc[1] == "OptimizerSpec":
        del loc[1]  # and the member's name: optimizer.OptimizerSpec.x
    where = ".".join(str(part) for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        # the strategy's tag picks its member in `_fields_at`; the optimizer's name does not
        path = loc if loc[:1] == ["optimizer"] else error["loc"]
        near = difflib.get_close_matches(str(loc[-1]), _fields_at(model, path[:-1]), 1)
        return f"{where}: unknown field" + (f"; did you mean '{near[0]}'?" if near else "")
    if error["type"] == "union_tag_invalid":
        tag = error["ctx"]["tag"]
        return f"{where}.kind: unknown strategy '{tag}'; allowed: {error['ctx']['expected_tags']}"
    if error["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the model at pydantic's location `loc` in `model` (a tagged
    union's member is the one its tag, next in `loc`, names); none if `loc` leads to no
    model."""
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        members = [
            m
            for m in typing.get_args(field.annotation) or (field.annotation,)
            if isinstance(m, type) and issubclass(m, BaseModel)
        ]
        if field.discriminator and parts:
            key, tag = str(field.discriminator), parts.pop(0)
            members = [m for m in members if m.model_fields[key].default == tag]
        if len(members) != 1:
            return []
        model = members[0]
    return list(model.model_fields)


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, *, source: str = "spec") -> M:
    """Validate `data` into `model`, turning pydantic's report into a one-screen SpecError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # a mapping given for `optimizer` fails as a reference too: that is no news
        errors = [e for e in exc.errors() if list(e["loc"][:2]) != ["optimizer", "str"]]
        lines = [_describe(e, model) for e in errors or exc.errors()]
        raise SpecError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (of `what`), or a one-line `SpecError`."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p} must hold a mapping of {what}, not {type(data).__name__}")
    return data


def parse_job(data: Any, *, source: str = "spec") -> AnyJobSpec:
    """Validate a job of any kind: its ``kind`` picks the model (default ``torch``)."""
    kind = data.get("kind", "torch") if isinstance(data, dict) else "torch"
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise SpecError(
            f"invalid {source}:\n  kind: unknown job kind {kind!r}; allowed: {', '.join(KINDS)}"
        )
    return parse(model, data, source=source)  # type: ignore[return-value]


def load_spec(path: str | Path) -> AnyJobSpec:
    """Read and validate a YAML job file, of any kind."""
    return parse_job(read_mapping(path, "job fields"), source=str(path))
