"""``corral tune job.yaml --space space.yaml``: a hyperparameter search, here or on the
server (``--server``: as the chosen login, its trials jobs of your team's queue).

It shows the trials as they go (a live table on a terminal, a line per change
otherwise), writes the best trial's job spec as YAML, and ends with exit 1 when the
search failed. The same command again continues the same search, or shows it once it
has ended; Ctrl-C leaves a search on the server running (a local one stops its trials,
which the same command restarts from their checkpoints).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Group
from rich.live import Live
from rich.text import Text

from corral.errors import CorralError, SpecError

if TYPE_CHECKING:
    from corral.service.models import SearchDetail


class _Lines:
    """A line for each trial whose state or epochs changed: for logs and pipes."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, int]] = {}

    def __call__(self, detail: SearchDetail) -> None:
        from corral.service.tuning import _number

        for trial in detail.trial_list:
            now = (trial.state, trial.epochs)
            if self.seen.get(trial.number) == now:
                continue
            self.seen[trial.number] = now
            params = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in trial.params.items()
            )
            tail = f" ({trial.reason})" if trial.state == "fail" else ""
            print(
                f"trial {trial.number} {trial.state} epoch {trial.epochs} "
                f"{detail.metric} {_number(trial.value)}  {params}{tail}",
                flush=True,
            )


def tune(
    ctx: typer.Context,
    job: Annotated[Path, typer.Argument(help="YAML job spec, as for corral train")],
    space: Annotated[Path, typer.Option(help="YAML: spec fields to ranges or choices")],
    name: Annotated[
        str, typer.Option(help="the search's name; the same again continues it")
    ] = "search",
    metric: Annotated[str, typer.Option(help="an epoch metric the job reports")] = "val_accuracy",
    mode: Annotated[str, typer.Option(help="max or min")] = "max",
    trials: Annotated[int, typer.Option(help="trials in all, failures included")] = 16,
    concurrency: Annotated[int, typer.Option(help="trials at once, at most")] = 2,
    sampler: Annotated[str, typer.Option(help="tpe, random, grid or cmaes")] = "tpe",
    pruner: Annotated[str, typer.Option(help="asha, hyperband, median or none")] = "asha",
    pbt: Annotated[
        bool, typer.Option(help="population based training instead of a pruner")
    ] = False,
    population: Annotated[int, typer.Option(help="PBT: trials training at once")] = 4,
    interval: Annotated[int, typer.Option(help="PBT: epochs between exploit steps")] = 2,
    min_epochs: Annotated[int, typer.Option(help="epochs before ASHA/Hyperband prune")] = 1,
    max_failures: Annotated[
        int, typer.Option(help="stop after this many failed trials in a row")
    ] = 3,
    seed: Annotated[int, typer.Option(help="the sampler's seed")] = 0,
    server: Annotated[
        bool, typer.Option(help="run on the server you logged in to, as your team's jobs")
    ] = False,
    folder: Annotated[Path, typer.Option(help="where a local search keeps its state")] = Path(
        "corral-tune"
    ),
    best: Annotated[
        Path | None, typer.Option(help="write the best trial's job here (default NAME-best.yaml)")
    ] = None,
    detach: Annotated[bool, typer.Option(help="with --server: start it and return")] = False,
) -> None:
    """Search a job's hyperparameters: each trial a job, pruned early when it lags."""
    from corral.service.commands import _client, _note, _out, _run
    from corral.service.tuning import (
        follow,
        run_local,
        search_request,
        search_settings,
        summary,
        trial_table,
    )
    from corral.spec import read_mapping

    def searched(request: dict[str, Any], show: Callable[[SearchDetail], None]) -> SearchDetail:
        if not server:
            _note(f"searching locally; its state is in {folder.resolve()}")
            return run_local(request, folder=folder.resolve(), on_update=show)
        with _client(ctx) as client:
            made = client.start_search(request)
            _note(f"search {made.name} is {made.id} on the server")
            if detach:
                return made
            return follow(lambda: client.search(made.id), show)

    def action() -> None:
        if detach and not server:
            raise SpecError("--detach: only a search on a server (--server) goes on alone")
        settings = search_settings(
            name=name,
            metric=metric,
            mode=mode,
            trials=trials,
            concurrency=concurrency,
            sampler=sampler,
            pruner=None if pbt else {"kind": pruner, "min_epochs": min_epochs},
            pbt={"population": population, "interval": interval} if pbt else None,
            max_failures=max_failures,
            seed=seed,
        )
        space_map = read_mapping(space, "spec fields to ranges or choices")
        request = search_request(job, space_map, settings)
        if sys.stdout.isatty():  # a live table, redrawn at each look
            with Live(console=_out(), auto_refresh=False, transient=True) as live:
                detail = searched(request, lambda d: live.update(_view(d), refresh=True))
        else:  # a line per change, for logs and pipes
            detail = searched(request, _Lines())
        if detach:
            return
        _out().print(summary(detail), markup=False)
        _out().print(trial_table(detail))
        if detail.best_spec is not None:
            target = best or Path(f"{name}-best.yaml")
            target.write_text(yaml.safe_dump(detail.best_spec, sort_keys=False))
            assert detail.best is not None
            _note(
                f"best: trial {detail.best.number}, {metric} {detail.best.value:.4g}; "
                f"its job is in {target} (corral train {target})",
                markup=False,
            )
        if detail.state != "succeeded":
            raise CorralError(f"the search {detail.state}: {detail.reason}")

    _run(action)


def _view(detail: SearchDetail) -> Group:
    from corral.service.tuning import summary, trial_table

    return Group(Text(summary(detail)), trial_table(detail))
