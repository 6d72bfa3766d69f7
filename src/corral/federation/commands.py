"""``corral fl serve`` and ``corral fl join``: a federated job with real clients."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.console import err, guarded

fl_app = typer.Typer(
    help="Federated jobs with real clients: serve the aggregator, join as a client.",
    no_args_is_help=True,
)


def _spec(job: Path) -> Any:
    from corral.errors import SpecError
    from corral.spec import JobSpec, load_spec

    spec = load_spec(job)
    if not isinstance(spec, JobSpec):
        raise SpecError(f"{job}: corral fl runs a torch job with a federated strategy")
    return spec


@fl_app.command()
def serve(
    job: Annotated[Path, typer.Argument(help="YAML job spec with a federated strategy")],
    folder: Annotated[
        Path | None, typer.Option(help="checkpoints and keys; the same folder resumes")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="address to listen on [default: federation.host]")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="port, 0 a free one [default: federation.port]")
    ] = None,
    round_timeout: Annotated[
        float | None, typer.Option(help="seconds a round waits [federation.round_timeout]")
    ] = None,
    wait: Annotated[
        float | None, typer.Option(help="seconds to wait for min_clients [federation.wait]")
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(help="the root aggregator's address: serve this site as its edge"),
    ] = None,
) -> None:
    """Run the aggregator: print the address clients join, then serve every round.

    The options default to the spec's ``federation`` section (or its defaults). With
    ``--parent`` it is an edge: the root starts its rounds, and sees only its sum."""

    def action() -> None:
        spec = _spec(job)
        from corral.federation.serving import aggregator_for
        from corral.federation.wire import JoinAddress
        from corral.spec import Federation
        from corral.train.progress import format_metrics

        logging.getLogger("corral").setLevel(logging.INFO)
        given = {"host": host, "port": port, "round_timeout": round_timeout, "wait": wait}
        settings = (spec.federation or Federation()).model_copy(
            update={k: v for k, v in given.items() if v is not None}
        )
        where = folder or Path.cwd() / "corral-runs" / f"fl-{spec.name or job.stem}"
        parent_address = JoinAddress.parse(parent) if parent is not None else None
        aggregator = aggregator_for(
            spec, base=job.resolve().parent, folder=where, settings=settings, parent=parent_address
        )
        # the address holds the job's token: shown here once, and kept (mode 0600) in
        # the folder's enrolment file, never logged
        err.print(
            f"join with: corral fl join '{aggregator.address.url()}' --job {job}",
            highlight=False,
            soft_wrap=True,
        )
        if aggregator.start_round:
            err.print(f"resuming at round {aggregator.start_round + 1} from {where}")

        def show(row: dict[str, Any]) -> None:
            err.print(
                f"round {row['epoch']:.0f}/{spec.epochs}  {row['clients_reported']:.0f}/"
                f"{row['clients']:.0f} clients  {format_metrics(row)}",
                highlight=False,
            )

        history = aggregator.run(show)
        kept = "for the root" if parent is not None else f"; checkpoints in {where}"
        err.print(f"{len(history)} rounds{kept}", highlight=False)

    guarded(action)


@fl_app.command(name="join")
def join_command(
    url: Annotated[str, typer.Argument(help="the address corral fl serve printed")],
    job: Annotated[Path, typer.Option(help="the job's YAML spec (its model, loss, data)")],
    data: Annotated[
        Path | None, typer.Option(help="this client's Parquet data (default: the job's)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="how the aggregator calls it")] = None,
    timeout: Annotated[float, typer.Option(help="give up after this many silent s")] = 600.0,
) -> None:
    """Join a federated job as a client: its data stays here, only updates leave."""

    def action() -> None:
        spec = _spec(job)
        from corral.data import as_source
        from corral.federation.client import join
        from corral.federation.wire import JoinAddress

        address = JoinAddress.parse(url)
        base = job.resolve().parent
        path = data if data is not None else base / spec.data.path
        source = as_source(path, features=spec.data.features, label=spec.data.label)
        started = time.monotonic()
        done = join(address, spec, source, base=base, name=name, timeout=timeout)
        err.print(
            f"trained {done.rounds} rounds in {time.monotonic() - started:.1f} s; the job is done",
            highlight=False,
        )

    guarded(action)
