"""A search in MLflow: a parent run for the search, each trial's own run its child.

The trials' runs are the runs their jobs log anyway (`corral.train.tracking`: the
trial's spec as params, its epochs as metrics, its model); the search adds a parent run
and names it in each trial's spec (``tracking.parent_run_id``), which is how MLflow's
UI nests runs. The parent holds the search's settings and space as params, each ended
trial's value of the metric at step = trial number, and, once the search ends, the
best trial's params (``best.<path>``) and value. Its id is kept in the study, so a
restarted driver goes on with the same parent, and what it logged is read back from
MLflow, so nothing is logged twice.
"""

from __future__ import annotations

import json
from typing import Any

from corral.search.driver import TrialHost, TrialStatus, best_trial
from corral.spec import MLflow, parse

#: The study's user attribute that holds the parent run's id.
PARENT_ATTR = "mlflow.parent_run_id"


def tracking_of(spec: dict[str, Any], *, uri: str | None, team: str) -> MLflow | None:
    """Where a search is tracked: the service's MLflow store in the team's experiment,
    else the job's own ``tracking``, else nowhere."""
    if uri is not None:
        return MLflow(uri=uri, experiment=team)
    if spec.get("tracking"):
        return parse(MLflow, {"kind": "mlflow", **spec["tracking"]}, source="tracking")
    return None


class ParentRun:
    """The search's parent run, made once and kept in the study."""

    def __init__(
        self, tracking: MLflow, study: Any, *, name: str, search_id: str, metric: str
    ) -> None:
        from corral.train.tracking import client_for, open_run

        self.tracking, self.study, self.metric = tracking, study, metric
        self.client = client_for(tracking)
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is None:
            parent = tracking.model_copy(update={"run_id": None, "run_name": name})
            run_id = open_run(parent, tags={"corral.search": search_id})
            study.set_user_attr(PARENT_ATTR, run_id)
        self.run_id: str = run_id
        self._logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, self._key)}

    @property
    def _key(self) -> str:
        return f"trial_{self.study.user_attrs.get('metric', 'value')}"

    def start(self, settings: dict[str, Any], space: dict[str, Any]) -> None:
        """Log the search's settings and space as params (once: MLflow refuses a param
        logged again with another value, and these never change)."""
        from mlflow.entities import Param

        if self.client.get_run(self.run_id).data.params:
            return
        flat = {
            f"search.{k}": json.dumps(v) if not isinstance(v, str) else v
            for k, v in settings.items()
        }
        flat |= {f"space.{k}": json.dumps(v) for k, v in space.items()}
        params = [Param(k, v[:6000]) for k, v in flat.items()]
        self.client.log_batch(self.run_id, params=params[:100])

    def child(self, number: int, spec: dict[str, Any], name: str) -> dict[str, Any]:
        """Trial `number`'s spec, tracked as a child run of this one."""
        tracking = {
            **self.tracking.model_dump(mode="json", exclude_none=True),
            **(spec.get("tracking") or {}),
            "parent_run_id": self.run_id,
            "run_name": f"{name}-t{number}",
        }
        return {**spec, "tracking": tracking}

    def record(self) -> None:
        """Log each trial that ended since the last look: its value at its number."""
        from mlflow.entities import Metric

        metric = self.metric
        rows = []
        for trial in self.study.get_trials(deepcopy=False):
            if trial.value is None or trial.number in self._logged:
                continue
            if not trial.state.is_finished():
                continue
            rows.append(Metric(f"trial_{metric}", float(trial.value), 0, trial.number))
            self._logged.add(trial.number)
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def end(self, state: str) -> None:
        """The best trial's params and value, and the run's end: FINISHED for a search
        that succeeded, FAILED or KILLED (cancelled) otherwise."""
        from mlflow.entities import Metric, Param

        metric = self.metric
        self.record()
        best = best_trial(self.study)
        if best is not None:
            params = [Param(f"best.{k}", str(v)) for k, v in best.params.items()]
            params.append(Param("best.trial", str(best.number)))
            have = self.client.get_run(self.run_id).data.params
            fresh = [p for p in params if p.key not in have]
            self.client.log_batch(
                self.run_id,
                metrics=[Metric(f"best_{metric}", float(best.value or 0.0), 0, 0)],
                params=fresh,
            )
        status = {"succeeded": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(self.run_id, status)


class TrackedTrials:
    """A host whose trials' jobs are tracked as children of the search's run."""

    def __init__(self, host: TrialHost, parent: ParentRun, name: str) -> None:
        self.host, self.parent, self.name = host, parent, name

    def submit(self, number: int, spec: dict[str, Any]) -> str:
        return self.host.submit(number, self.parent.child(number, spec, self.name))

    def status(self, job: str) -> TrialStatus:
        return self.host.status(job)

    def stop(self, job: str, reason: str) -> None:
        self.host.stop(job, reason)

    def checkpoint(self, job: str) -> str | None:
        return self.host.checkpoint(job)
