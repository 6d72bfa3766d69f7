"""A hyperparameter search: its settings, its Optuna study, and the driver that runs
its trials as jobs.

The driver decides; a `TrialHost` executes. Each `Driver.step` reads every running
trial's new epoch rows from its job, reports them to the study, stops the trials the
pruner gives up on, records the ones that ended, and asks the sampler for new trials
while fewer than ``concurrency`` run. Everything it needs to go on is in the study's
storage (the trial's job id is a system attribute of the trial, the job is submitted
with a key made of the search and the trial number), so a driver made afresh on the
same storage after a crash continues the same search: no finished trial runs again, a
running one is followed where it is, and the search stops at the same number of trials.

Hyperband's brackets come from a CRC32 of the study name and trial number (Optuna's),
not Python's salted ``hash``, so they are the same in every process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from corral.errors import SpecError
from corral.search.space import Space, apply
from corral.spec import JobSpec, _Model, parse_job

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("corral.tune")

#: The trial's system attribute that holds its job's id.
JOB_ATTR = "corral.job"
#: The trial's user attribute that holds why it failed or was pruned.
REASON_ATTR = "reason"
#: The trial's system attribute that holds the checkpoint its job starts from (PBT).
RESUME_ATTR = "corral.resume_from"


class Pruner(_Model):
    """When to stop a trial early, from its per-epoch reports of the metric.

    ``asha`` is asynchronous successive halving: at each rung (``min_epochs``, then ×
    ``reduction_factor``) a trial goes on only if it is in the top 1/``reduction_factor``
    of the trials that reached that rung. ``hyperband`` runs several such brackets.
    ``median`` stops a trial below the median of earlier trials at the same epoch.
    """

    kind: Literal["asha", "hyperband", "median", "none"] = "asha"
    min_epochs: int = Field(1, ge=1, description="epochs every trial runs (ASHA, Hyperband)")
    reduction_factor: int = Field(3, ge=2, description="ASHA and Hyperband's η")
    warmup_epochs: int = Field(1, ge=0, description="median: epochs before it may prune")
    startup_trials: int = Field(4, ge=0, description="median: trials that are never pruned")


class Pbt(_Model):
    """Population based training: ``population`` trials train at once; each time one
    reaches a multiple of ``interval`` epochs in the bottom ``quantile`` of the
    population, it stops, and a new trial goes on from the committed checkpoint of one
    in the top ``quantile``, with that one's values perturbed (× 1 ± ``perturb``) or, with
    probability ``resample``, drawn afresh."""

    population: int = Field(4, ge=2, description="trials training at once")
    interval: int = Field(2, ge=1, description="epochs between two exploit decisions")
    quantile: float = Field(0.25, gt=0, le=0.5, description="the bottom and top fraction")
    perturb: float = Field(0.2, gt=0, lt=1, description="a value moves by × (1 ± this)")
    resample: float = Field(0.25, ge=0, le=1, description="chance a value is drawn afresh")


class SearchSettings(_Model):
    """How to search: the metric, the budget, the sampler and the pruner."""

    name: str = Field("search", pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    metric: str = Field("val_accuracy", description="an epoch metric the job reports")
    mode: Literal["max", "min"] = "max"
    trials: int = Field(16, ge=1, le=10_000, description="trials in all, failures included")
    concurrency: int = Field(2, ge=1, description="trials running at once, at most")
    sampler: Literal["random", "grid", "tpe", "cmaes"] = "tpe"
    pruner: Pruner = Field(default_factory=Pruner)
    max_failures: int = Field(
        3, ge=1, description="stop the search after this many failed trials in a row"
    )
    seed: int = 0
    pbt: Pbt | None = Field(
        None, description="population based training instead of pruning (`corral.search.pbt`)"
    )

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner(cls, value: Any) -> Any:
        """A name stands for that pruner with its defaults."""
        return {"kind": value} if isinstance(value, str) else value


class SearchRequest(_Model):
    """A whole search: the job to vary, the space, and how to search. The body of
    ``POST /api/searches``, and what ``corral tune`` and `corral.tune` build.

    Validating it checks the search (`check`): a bad one fails before any trial runs."""

    spec: dict[str, Any] = Field(description="the job spec, as `corral train` reads it")
    space: Space
    settings: SearchSettings = Field(default_factory=SearchSettings)

    @model_validator(mode="after")
    def _runs(self) -> SearchRequest:
        check(self.settings, self.space, self.spec)
        return self


@dataclass(frozen=True)
class TrialStatus:
    """What a host knows of a trial's job.

    Attributes:
        state: ``waiting`` (queued or starting), ``running``, ``succeeded``, ``failed``
            or ``stopped`` (cancelled or preempted by someone else).
        epochs: The job's epoch rows so far, in order, each at most once.
        reason: Why it failed or stopped.
    """

    state: Literal["waiting", "running", "succeeded", "failed", "stopped"]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""


class TrialHost(Protocol):
    """Where a search's trials run: the job service's queue, locally or on a server."""

    def submit(self, number: int, spec: dict[str, Any]) -> str:
        """Submit trial `number`'s job; the same number again gives the same job."""

    def status(self, job: str) -> TrialStatus: ...

    def stop(self, job: str, reason: str) -> None:
        """Stop the job now, freeing its resources."""

    def checkpoint(self, job: str) -> str | None:
        """A copy of the job's newest committed checkpoint, kept for the search, that
        another trial's job may start from (PBT); ``None`` before its first."""


@dataclass(frozen=True)
class Outcome:
    """How a search ended: ``succeeded`` (its trials all ran) or ``failed``."""

    state: Literal["succeeded", "failed"]
    reason: str


def make_study(settings: SearchSettings, space: Space, storage: Any) -> optuna.Study:
    """The search's study on `storage`: made, or loaded when it is there already.

    A loaded study's sampler is seeded past the trials it holds: seeded as at the start,
    a random sampler would draw again the values of the first trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=settings.name,
        storage=storage,
        direction="maximize" if settings.mode == "max" else "minimize",
        sampler=_sampler(settings, space, 0),
        pruner=_pruner(settings.pruner) if settings.pbt is None else _pruner(Pruner(kind="none")),
        load_if_exists=True,
    )
    held = len(study.get_trials(deepcopy=False))
    if held:
        study.sampler = _sampler(settings, space, held)
    return study


def check(settings: SearchSettings, space: Space, spec: Mapping[str, Any]) -> None:
    """Refuse a search that cannot run, before its first trial: a space the job refuses,
    a grid smaller than nothing, a budget its epochs cannot prune within.

    Raises:
        SpecError: in one line.
    """
    job = parse_job(dict(spec), source="job")
    space.check(spec)
    if settings.pbt is not None:
        if not isinstance(job, JobSpec):
            raise SpecError(f"pbt: a {job.kind} job keeps no checkpoints to exploit; use a pruner")
        _check_pbt(settings, settings.pbt, job)
    if settings.sampler == "grid":
        size = math.prod(len(v) for v in space.grid().values())
        if settings.trials > size:
            raise SpecError(
                f"trials: {settings.trials} is more than the grid's {size} points; "
                f"ask for at most {size}"
            )
    pruner = settings.pruner
    if (
        settings.pbt is None
        and pruner.kind in ("asha", "hyperband")
        and pruner.min_epochs >= job.epochs
    ):
        raise SpecError(
            f"pruner.min_epochs: {pruner.min_epochs} leaves nothing to prune in "
            f"{job.epochs} epochs; lower it or raise epochs"
        )


def _check_pbt(settings: SearchSettings, pbt: Pbt, job: JobSpec) -> None:
    if "pruner" in settings.model_fields_set and settings.pruner.kind != "none":
        raise SpecError("pruner: PBT replaces the trials that lag itself; set pruner: none")
    if settings.sampler == "grid":
        raise SpecError("sampler: PBT draws its first population; use random, tpe or cmaes")
    if pbt.interval >= job.epochs:
        raise SpecError(
            f"pbt.interval: {pbt.interval} epochs leaves no exploit step in {job.epochs} "
            "epochs; lower it or raise epochs"
        )
    if settings.trials < pbt.population:
        raise SpecError(f"trials: {settings.trials} cannot hold a population of {pbt.population}")
    if job.checkpoint.every > pbt.interval or pbt.interval % job.checkpoint.every:
        raise SpecError(
            f"checkpoint.every: {job.checkpoint.every} must divide pbt.interval "
            f"({pbt.interval}): a trial exploits only committed checkpoints"
        )


def _sampler(settings: SearchSettings, space: Space, offset: int) -> optuna.samplers.BaseSampler:
    import optuna

    seed = settings.seed + offset
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if settings.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(pruner: Pruner) -> optuna.pruners.BasePruner:
    import optuna

    if pruner.kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner.min_epochs, reduction_factor=pruner.reduction_factor
        )
    if pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_epochs, reduction_factor=pruner.reduction_factor
        )
    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs
        )
    return optuna.pruners.NopPruner()


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial, or ``None`` before one completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def trial_spec(
    spec: Mapping[str, Any], settings: SearchSettings, number: int, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Trial `number`'s job: the search's job with the trial's values, named after both."""
    return {**apply(spec, params), "name": f"{settings.name}-t{number}"}


class Driver:
    """Runs one search's trials through a host, one `step` at a time (see the module)."""

    def __init__(
        self,
        study: optuna.Study,
        *,
        spec: Mapping[str, Any],
        space: Space,
        settings: SearchSettings,
        host: TrialHost,
    ) -> None:
        self.study, self.spec, self.space = study, dict(spec), space
        self.settings, self.host = settings, host

    def step(self) -> Outcome | None:
        """Advance the search once; its outcome once it has ended, else ``None``."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            outcome = self._follow(trial)
            if outcome is not None:
                return outcome
        trials = self.study.get_trials(deepcopy=False)
        failed = self._failures_in_a_row(trials)
        if failed:
            return self._end("failed", failed)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        total = len(trials)
        while running < self.settings.concurrency and total < self.settings.trials:
            self._launch()
            running, total = running + 1, total + 1
        if running == 0 and total >= self.settings.trials:
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            if not done:
                return self._end("failed", "no trial completed")
            return Outcome("succeeded", f"the best is trial {self.best_number}")
        return None

    @property
    def best_number(self) -> int | None:
        best = best_trial(self.study)
        return None if best is None else best.number

    def stop_all(self, reason: str) -> None:
        """Stop every running trial (a search cancelled, or ended by its failures)."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            job = trial.system_attrs.get(JOB_ATTR)
            if job is not None:
                self.host.stop(job, reason)
            self._tell(trial, TrialState.FAIL, reason)

    def _end(self, state: Literal["succeeded", "failed"], reason: str) -> Outcome:
        self.stop_all(f"the search ended: {reason}")
        return Outcome(state, reason)

    def _launch(self) -> None:
        trial = self.study.ask()
        params = self.space.suggest(trial)
        self._submit(trial.number, trial._trial_id, params)

    def _submit(self, number: int, trial_id: int, params: Mapping[str, Any]) -> str:
        spec = trial_spec(self.spec, self.settings, number, params)
        resume = self.study._storage.get_trial(trial_id).system_attrs.get(RESUME_ATTR)
        if resume is not None:
            spec["resume_from"] = resume
        job = self.host.submit(number, spec)
        self.study._storage.set_trial_system_attr(trial_id, JOB_ATTR, job)
        return job

    def _follow(self, trial: optuna.trial.FrozenTrial) -> Outcome | None:
        from optuna.trial import TrialState

        job = trial.system_attrs.get(JOB_ATTR)
        if job is None:  # the search stopped between asking for the trial and noting its job
            job = self._submit(trial.number, trial._trial_id, trial.params)
        status = self.host.status(job)
        storage = self.study._storage
        metric = self.settings.metric
        for row in status.epochs:
            epoch = int(row["epoch"])
            if epoch in trial.intermediate_values:
                continue
            if metric not in row:
                reported = ", ".join(k for k in row if k not in ("kind", "epoch", "epochs"))
                return self._end(
                    "failed",
                    f"metric '{metric}' is not reported; the job reports {reported}"
                    + (" (val_* need validation data)" if metric.startswith("val_") else ""),
                )
            value = float(row[metric])
            if math.isnan(value):
                value = -math.inf if self.settings.mode == "max" else math.inf
            storage.set_trial_intermediate_value(trial._trial_id, epoch, value)
            if status.state == "running" and self.study.pruner.prune(
                self.study, storage.get_trial(trial._trial_id)
            ):
                reason = f"pruned at epoch {epoch} ({metric} {row[metric]:.4g})"
                self.host.stop(job, reason)
                self._tell(trial, TrialState.PRUNED, reason)
                return None
        if status.state == "succeeded":
            values = storage.get_trial(trial._trial_id).intermediate_values
            if not values:
                self._tell(trial, TrialState.FAIL, "it ended without reporting an epoch")
            else:
                self.study.tell(trial.number, values[max(values)])
        elif status.state in ("failed", "stopped"):
            self._tell(trial, TrialState.FAIL, status.reason or status.state)
        return None

    def _tell(
        self, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState, reason: str
    ) -> None:
        self.study._storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        self.study.tell(trial.number, state=state)

    def _failures_in_a_row(self, trials: list[optuna.trial.FrozenTrial]) -> str:
        """Why the search must stop, when its last ``max_failures`` ended trials all
        failed (counted from the study, so a restarted driver counts the same)."""
        from optuna.trial import TrialState

        ended = sorted(
            (t for t in trials if t.state.is_finished() and t.datetime_complete is not None),
            key=lambda t: (t.datetime_complete, t.number),
        )
        last = ended[-self.settings.max_failures :]
        if len(last) < self.settings.max_failures:
            return ""
        if all(t.state == TrialState.FAIL for t in last):
            why = last[-1].user_attrs.get(REASON_ATTR, "unknown")
            return f"the last {len(last)} trials failed; the last one: {why}"
        return ""
