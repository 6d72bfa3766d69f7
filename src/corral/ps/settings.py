"""The parameter server's settings, defined once, and the consistency model they select.

`ServerSettings` is the whole of what a user chooses for the servers. The
`ParameterServer` strategy inherits its fields (so ``corral.ParameterServer(mode="ssp",
staleness=3)`` and YAML's ``strategy:`` mapping stay as they are), and every server
process is handed the same frozen object together with the worker count; nothing
re-lists the fields on the way down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from corral.ps.asynchronous import Asynchronous
from corral.ps.consistency import Consistency, LrScaling, mean_of_arrays
from corral.ps.softsync import SoftSynchronous
from corral.ps.ssp import StaleSynchronous
from corral.ps.sync import BulkSynchronous

Mode = Literal["sync", "async", "ssp", "softsync"]

#: The settings only one mode reads, and that mode: set elsewhere, they would do nothing.
_ONLY_IN = {"staleness": "ssp", "quorum": "softsync"}


class ServerSettings(BaseModel):
    """How the servers apply gradients: the consistency model and the optimizer.

    Example:
        >>> ServerSettings(mode="ssp", staleness=3, optimizer_args={"lr": 0.05})
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "sync"
    staleness: int = Field(0, ge=0, description="ssp: most clocks a worker may run ahead")
    quorum: int = Field(1, ge=1, description="softsync: gradients averaged per update")
    lr_scaling: LrScaling = None
    optimizer: Literal["sgd", "adam"] = "sgd"
    optimizer_args: dict[str, float] = Field(default_factory=lambda: {"lr": 0.05})
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="save each shard every this many updates; a killed server is then "
        "restarted from it (counts against max_restarts) instead of failing the attempt",
    )

    @field_validator("staleness", "quorum")
    @classmethod
    def _only_in_its_mode(cls, value: int, info: ValidationInfo) -> int:
        """Refuse a setting the chosen mode ignores: ``mode="ssp", quorum=2`` would
        otherwise train silently without the quorum its author meant."""
        field = info.field_name
        assert field is not None  # a field validator always has its field
        mode, default = info.data.get("mode"), cls.model_fields[field].default
        if mode is not None and mode != _ONLY_IN[field] and value != default:
            raise ValueError(f"only mode '{_ONLY_IN[field]}' uses it, but mode is '{mode}'")
        return value


def consistency_for(
    settings: ServerSettings,
    workers: int,
    *,
    average: Callable[[list[Any]], Any] = mean_of_arrays,
) -> Consistency:
    """The consistency model `settings` name, for a job of `workers` workers.

    `average` turns a group of gradients into one (sync, softsync); the server passes one
    that also averages sparse rows.
    """
    common: dict[str, Any] = {"lr_scaling": settings.lr_scaling, "average": average}
    if settings.mode == "sync":
        return BulkSynchronous(workers, **common)
    if settings.mode == "async":
        return Asynchronous(workers, **common)
    if settings.mode == "ssp":
        return StaleSynchronous(workers, staleness=settings.staleness, **common)
    return SoftSynchronous(workers, quorum=settings.quorum, **common)
