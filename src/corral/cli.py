"""The ``corral`` command: ``corral run`` for your own code, ``corral train`` for YAML jobs.

Errors corral raises on purpose are printed as one line (plus the worker's own traceback
when a worker failed), never as a stack trace of corral itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.console import err, guarded
from corral.federation.commands import fl_app
from corral.service.commands import register
from corral.service.tune_command import tune

if TYPE_CHECKING:
    from corral.service.isolation import Mode
    from corral.service.mlflow_auth import Admin
    from corral.spec import ClassicSpec

app = typer.Typer(
    help="corral: distributed PyTorch training on local processes or Spark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="train.py, or module:function")],
    workers: Annotated[int, typer.Option(help="number of worker processes")] = 1,
    cpus_per_worker: Annotated[int, typer.Option(help="CPU threads per worker")] = 1,
    max_restarts: Annotated[int, typer.Option(help="restarts of the group on failure")] = 0,
    master_port: Annotated[int | None, typer.Option(help="fixed rendezvous port")] = None,
    mlflow_experiment: Annotated[
        str | None,
        typer.Option(help="track the run in this MLflow experiment (rank 0's reports)"),
    ] = None,
    mlflow_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default: MLFLOW_TRACKING_URI, ./mlflow.db)")
    ] = None,
) -> None:
    """Run a script (or function) on N workers with torch.distributed's variables set.

    Arguments after `--` are passed to the script: corral run train.py --workers 4 -- --lr 0.1
    """
    from corral.entrypoints import script_or_callable
    from corral.train.launcher import run as run_workers

    def action() -> None:
        fn, args = script_or_callable(target, list(ctx.args))
        tracking = None
        if mlflow_experiment is not None or mlflow_uri is not None:
            from corral.spec import MLflow

            tracking = MLflow(uri=mlflow_uri, experiment=mlflow_experiment or "corral")
        value = run_workers(
            fn,
            *args,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            max_restarts=max_restarts,
            master_port=master_port,
            tracking=tracking,
        )
        if value is not None:
            print(value)

    guarded(action)


@app.command()
def train(
    job: Annotated[Path, typer.Argument(help="YAML job spec")],
    workers: Annotated[int | None, typer.Option(help="override roles.worker.count")] = None,
) -> None:
    """Train the model a YAML job spec describes, with a live progress bar."""
    from corral.spec import JobSpec, load_spec

    def action() -> None:
        spec = load_spec(job)
        if workers is not None:
            spec.roles.worker.count = workers
            spec = type(spec).model_validate(spec.model_dump())
        if not isinstance(spec, JobSpec):
            _train_classic(spec, job.resolve().parent)
            return
        # only a valid spec pays for torch, pandas and pyspark: a bad one fails in a second
        from corral.jobs import trainer_for
        from corral.train.progress import RichProgress

        trainer, data, validation = trainer_for(spec, base=job.resolve().parent)
        count = spec.roles.worker.count
        steps = data.steps_per_epoch(count, spec.batch_size)
        with RichProgress(err, workers=count, steps=steps) as progress:
            result = trainer.fit(data, validation=validation, on_report=progress)
        err.print(progress.summary(result.history))
        err.print(f"last checkpoint: {result.checkpoint}", highlight=False)

    guarded(action)


def _train_classic(spec: ClassicSpec, base: Path) -> None:
    """``corral train`` of a classic kind: about 20 lines for a long boosting run, the
    model saved under ./corral-runs/<name>-<time>/."""
    from corral.classic import fit
    from corral.train.progress import format_metrics

    every = max(1, spec.epochs // 20)

    def show(row: dict[str, Any]) -> None:
        if row["epoch"] % every == 0 or row["epoch"] == row["epochs"]:
            err.print(f"{spec.kind} {row['epoch']}/{row['epochs']} {format_metrics(row)}")

    result = fit(spec, base=base, on_report=show)
    err.print(f"done: {format_metrics(result.metrics)}", highlight=False)
    err.print(f"model: {result.path}", highlight=False)


def _isolation_mode(value: str) -> Mode:
    from corral.errors import SpecError

    if value not in ("auto", "accounts", "none"):
        raise SpecError(f"--isolation: '{value}' is not one of auto, accounts, none")
    return value  # type: ignore[return-value]


def _mlflow_admin(uri: str | None) -> Admin | None:
    """The admin of an MLflow server with users, as MLflow's own client takes it: from
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``."""
    import os

    from corral.service.mlflow_auth import Admin

    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if uri is None or not uri.startswith(("http://", "https://")) or not username:
        return None
    return Admin(username, password or "")


@app.command()
def server(
    db: Annotated[
        str,
        typer.Option(
            envvar="CORRAL_DB",
            help="database URL: sqlite:///file.db, or postgresql://… (pass a password "
            "in CORRAL_DB: a command line is readable by every process in /proc)",
        ),
    ] = "sqlite:///corral-service.db",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port; 0 picks a free one")] = 8642,
    state_dir: Annotated[Path, typer.Option(help="job folders: logs, checkpoints")] = Path(
        "corral-service"
    ),
    cpus: Annotated[float | None, typer.Option(help="CPUs to schedule (default: all)")] = None,
    memory: Annotated[
        str | None, typer.Option(help="memory to schedule, e.g. 16g (default: all)")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs to schedule (default: all)")] = None,
    preemption: Annotated[
        bool, typer.Option(help="let high-priority jobs stop preemptible ones of their team")
    ] = False,
    spark_master: Annotated[
        str | None, typer.Option(help="run jobs on this Spark cluster, e.g. spark://host:7077")
    ] = None,
    spark_conf: Annotated[
        list[str] | None, typer.Option(help="Spark setting for the jobs, key=value (repeatable)")
    ] = None,
    spark_team_conf: Annotated[
        list[str] | None,
        typer.Option(
            help="a Spark setting for one team's jobs, which they cannot override, "
            "team:key=value (repeatable), e.g. vision:spark.kubernetes.namespace=vision"
        ),
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            help="track every job on this MLflow store, in its team's experiment; with "
            "MLFLOW_TRACKING_USERNAME/PASSWORD of an admin of its basic-auth app, each team "
            "reads only its own"
        ),
    ] = None,
    mlflow_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="start an MLflow server on 127.0.0.1:PORT (its files in --state-dir) and "
            "track every job there; each team reads only its own runs",
        ),
    ] = None,
    mlflow_command: Annotated[
        str | None,
        typer.Option(help="the mlflow program --mlflow-port runs (default: ./.venv-mlflow's)"),
    ] = None,
    isolation: Annotated[
        str,
        typer.Option(
            help="auto: as root, each team's jobs run as its own OS account inside "
            "enforced limits; none: one-user mode; accounts: require it"
        ),
    ] = "auto",
    api_processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="processes serving the API on the one port (the first also runs the "
            "scheduler). 1 by default: a submit costs a few ms of CPU, so one process "
            "serves hundreds a second; more help only where the API's CPU is the limit and "
            "cores are free, and each holds its own database connections (up to 50 on "
            "PostgreSQL) and memory",
        ),
    ] = 1,
) -> None:
    """Start the job service: REST API and web UI on one port, jobs on this machine (or on
    a Spark cluster, whose capacity is then the pool)."""
    from corral.errors import SpecError
    from corral.runtime.resources import Resources
    from corral.service.cluster import machine_pool, spark_pool
    from corral.service.scheduler import Policy
    from corral.service.server import ServerOptions, serve
    from corral.spec import RoleSpec, SparkSpec, parse

    def action() -> None:
        if mlflow_port is not None and mlflow_uri is not None:
            raise SpecError("--mlflow-port starts an MLflow server: leave out --mlflow-uri")
        if mlflow_command is not None and mlflow_port is None:
            raise SpecError("--mlflow-command: give --mlflow-port too")
        spark = None
        if spark_master is not None:
            pairs = [item.partition("=") for item in spark_conf or []]
            bad = [key for key, eq, _ in pairs if not eq]
            if bad:
                raise SpecError(f"--spark-conf: '{bad[0]}' is not key=value")
            spark = SparkSpec(master=spark_master, conf={k: v for k, _, v in pairs})
        teams: dict[str, dict[str, str]] = {}
        for item in spark_team_conf or []:
            team, colon, setting = item.partition(":")
            key, eq, value = setting.partition("=")
            if not (colon and eq and team and key):
                raise SpecError(f"--spark-team-conf: '{item}' is not team:key=value")
            teams.setdefault(team, {})[key] = value
        here = spark_pool(spark.master, spark.conf) if spark else machine_pool()
        mib = parse(RoleSpec, {"memory": memory}, source="--memory").memory if memory else None
        pool = Resources(
            cpus=here.cpus if cpus is None else cpus,
            memory_mib=here.memory_mib if mib is None else mib,
            gpus=here.gpus if gpus is None else gpus,
        )
        opts = ServerOptions(
            db=db,
            host=host,
            port=port,
            state_dir=state_dir.resolve(),
            pool=pool,
            policy=Policy(preemption=preemption),
            spark=spark,
            isolation=_isolation_mode(isolation),
            spark_teams=teams,
            mlflow_uri=mlflow_uri,
            mlflow_admin=_mlflow_admin(mlflow_uri),
            mlflow_port=mlflow_port,
            mlflow_command=mlflow_command,
            api_processes=api_processes,
        )
        serve(opts)

    guarded(action)


register(app)
app.command()(tune)
app.add_typer(fl_app, name="fl")


def main() -> None:
    """Console entry point (also ``python -m corral``)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    app(prog_name="corral")


if __name__ == "__main__":
    main()
