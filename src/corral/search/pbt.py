"""Population based training over jobs (Jaderberg et al., 2017), asynchronous.

A population of trials trains at once, each a job. When one has reported an epoch that
is a multiple of ``interval`` and stands in the bottom ``quantile`` of the population's
values at that epoch (the judgement waits for the members still short of it), it is
*exploited*: a new trial, of the same member, starts from the
newest committed checkpoint of a trial in the top ``quantile`` (a copy the host keeps,
so the winner's own retention cannot delete it), with the winner's values *explored*:
each moved by × (1 ± ``perturb``) within its range, or drawn afresh with probability
``resample``; then the lagging trial is stopped (pruned, so its resources are free).
A trial started so resumes its winner's history: its epochs continue the winner's.

Every decision is kept in the study (the epoch a trial was last judged at, each new
trial's member, parent and checkpoint), and its random draws are seeded by the search's
seed, the trial and the epoch, so a restarted driver decides as the first one did.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from corral.search.driver import (
    JOB_ATTR,
    REASON_ATTR,
    RESUME_ATTR,
    Driver,
    Outcome,
    Pbt,
    SearchSettings,
    TrialHost,
)
from corral.search.space import Param, Space

if TYPE_CHECKING:
    import optuna

#: Trial attributes: its member of the population, the trial it went on from, and the
#: last epoch it was judged at.
MEMBER, PARENT, JUDGED = "pbt.member", "pbt.parent", "pbt.judged"


def explore(space: Space, params: dict[str, Any], pbt: Pbt, rng: random.Random) -> dict[str, Any]:
    """The winner's values, each perturbed or drawn afresh, always inside its range."""
    out = {}
    for path, value in params.items():
        out[path] = _explore_one(space.root[path], value, pbt, rng)
    return out


def _explore_one(param: Param, value: Any, pbt: Pbt, rng: random.Random) -> Any:
    if param.choices is not None:
        return rng.choice(param.choices) if rng.random() < pbt.resample else value
    assert param.low is not None and param.high is not None
    low, high = param.low, param.high
    if rng.random() < pbt.resample:
        if param.log:
            moved = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            moved = rng.uniform(low, high)
    else:
        moved = value * rng.choice((1 - pbt.perturb, 1 + pbt.perturb))
    moved = min(max(moved, low), high)
    if param.step is not None:
        moved = min(low + round((moved - low) / param.step) * param.step, high)
    return round(moved) if param.type == "int" else moved


class PbtDriver(Driver):
    """A `Driver` whose trials are the members of a population (see the module)."""

    @property
    def settings_epochs(self) -> int:
        """The epochs each trial trains (a judgement at the last would stop nothing)."""
        return int(self.spec.get("epochs", 1))

    @property
    def pbt(self) -> Pbt:
        assert self.settings.pbt is not None
        return self.settings.pbt

    def step(self) -> Outcome | None:
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            outcome = self._follow(trial)
            if outcome is not None:
                return outcome
            self._judge(trial.number)
        trials = self.study.get_trials(deepcopy=False)
        failed = self._failures_in_a_row(trials)
        if failed:
            return self._end("failed", failed)
        founders = [t for t in trials if PARENT not in t.user_attrs]
        while len(founders) < self.pbt.population:
            self._launch()
            founders = [
                t for t in self.study.get_trials(deepcopy=False) if PARENT not in t.user_attrs
            ]
        trials = self.study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.RUNNING for t in trials):
            if not any(t.state == TrialState.COMPLETE for t in trials):
                return self._end("failed", "no trial completed")
            return Outcome("succeeded", f"the best is trial {self.best_number}")
        return None

    def _launch(self) -> None:
        founders = sum(PARENT not in t.user_attrs for t in self.study.get_trials(deepcopy=False))
        trial = self.study.ask()
        trial.set_user_attr(MEMBER, founders)
        self._submit(trial.number, trial._trial_id, self.space.suggest(trial))

    def _judge(self, number: int) -> None:
        """Exploit trial `number` if it has just reached a judging epoch in the bottom of
        the population, and the budget of trials allows one more."""
        from optuna.trial import TrialState

        storage = self.study._storage
        trial = storage.get_trial(self._trial_id(number))
        if trial.state != TrialState.RUNNING or not trial.intermediate_values:
            return
        # the last multiple of the interval it reached (two epochs may come in one look)
        epoch = max(trial.intermediate_values) // self.pbt.interval * self.pbt.interval
        if epoch == 0 or epoch >= self.settings_epochs or epoch <= trial.user_attrs.get(JUDGED, 0):
            return
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        # judged against the members' values at the same epoch: while another member is
        # still short of it, the judgement waits (its latest value, an epoch earlier,
        # would be an unfair comparison)
        peers = [t for t in running if epoch in t.intermediate_values]
        if len(peers) < 2 and any(max(t.intermediate_values, default=0) < epoch for t in running):
            return
        storage.set_trial_user_attr(trial._trial_id, JUDGED, epoch)
        if len(peers) < 2 or len(self.study.get_trials(deepcopy=False)) >= self.settings.trials:
            return
        sign = 1 if self.settings.mode == "max" else -1
        ranked = sorted(peers, key=lambda t: sign * t.intermediate_values[epoch], reverse=True)
        cut = max(1, math.floor(len(ranked) * self.pbt.quantile))
        if trial.number not in {t.number for t in ranked[-cut:]}:
            return
        rng = random.Random(f"{self.settings.seed}-{trial.number}-{epoch}")
        winner = rng.choice(ranked[:cut])
        if winner.number == trial.number:
            return
        path = self.host.checkpoint(winner.system_attrs[JOB_ATTR])
        if path is None:
            return
        params = explore(self.space, dict(winner.params), self.pbt, rng)
        self.study.enqueue_trial(
            params,
            user_attrs={MEMBER: trial.user_attrs.get(MEMBER, 0), PARENT: winner.number},
            skip_if_exists=False,
        )
        successor = self.study.ask()
        storage.set_trial_system_attr(successor._trial_id, RESUME_ATTR, path)
        values = self.space.suggest(successor)
        reason = (
            f"exploited at epoch {epoch}: trial {successor.number} goes on from trial "
            f"{winner.number}'s checkpoint"
        )
        self.host.stop(trial.system_attrs[JOB_ATTR], reason)
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        self.study.tell(trial.number, state=TrialState.PRUNED)
        self._submit(successor.number, successor._trial_id, values)

    def _trial_id(self, number: int) -> int:
        return int(self.study.get_trials(deepcopy=False)[number]._trial_id)


def make_driver(
    study: optuna.Study,
    *,
    spec: dict[str, Any],
    space: Space,
    settings: SearchSettings,
    host: TrialHost,
) -> Driver:
    """The driver a search's settings call for: PBT's, or pruning's."""
    cls = PbtDriver if settings.pbt is not None else Driver
    return cls(study, spec=spec, space=space, settings=settings, host=host)
