"""One attempt of a service job, as its own process: ``python -m corral.service.job DIR``.

The runner writes the validated spec to ``DIR/spec.json`` and starts this process in a
session of its own, its output going to ``DIR/log``. It trains with the same code as
``corral train``. Each report goes to ``DIR/metrics.jsonl`` as a JSON line (epoch rows,
and progress ticks for the live samples/s chart). Checkpoints go to
``DIR/checkpoints``, so an attempt after a failure, or after a server restart, resumes
from the newest one. The exit status goes to ``DIR/exit.json``, because a server that
restarted meanwhile is not this process's parent and cannot wait for it. Its workers
start as forks of a copy of this process made at its start (`corral.engines.forkserver`),
so they do not import torch again.

The spec's ``max_restarts`` is the budget the job has left: the launcher in this process
spends it on its workers' failures, with `corral.train.restarts.decide`. The exit status
says how many it spent and whether this process reached its own verdict (``final``): a
corral error, such as bad data, a NaN loss, or a worker failure the launcher gave up on.
The runner restarts only a process that ended otherwise (killed, say), with what is left.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from corral.comm.control import Message
from corral.data import as_source
from corral.engines import forkserver
from corral.errors import CheckpointError, CorralError, DataError, SpecError, WorkerError
from corral.runtime import checkpoint as ckpt
from corral.spec import AnyJobSpec, ClassicSpec, JobSpec, MLflow, parse_job
from corral.train.progress import format_metrics

SPEC, LOG, METRICS, EXIT = "spec.json", "log", "metrics.jsonl", "exit.json"
#: The restarts this attempt's launcher spent so far, rewritten at each: the runner reads
#: it when the process died without writing its exit status.
RESTARTS = "restarts.json"
#: The folder of the job's checkpoints, kept across its attempts.
CHECKPOINTS = "checkpoints"
#: The folder of a job served to real clients (``federation``): the aggregator's
#: checkpoints and its enrolment file.
FEDERATION = "federation"
#: The file the runner writes to ask the job to stop at its next checkpoint (preemption).
PREEMPT = "preempt"
#: The exit code of a job that stopped so.
PREEMPTED = 75
#: What the job's fork server runs: a worker process's module.
WORKER_MODULES = ("corral.train.worker",)
#: What a worker imports later, imported once by the fork server: torch's compiler,
#: which the first optimizer imports (1.5 s), and the process group's module.
WORKER_PRELOAD = ("torch._dynamo", "torch.distributed.distributed_c10d")
#: The job's MLflow run (``run_id``, ``experiment_id``, its page's ``url``), kept across
#: its attempts.
TRACKING = "mlflow.json"


class _Preempted(Exception):
    """Raised on the epoch report after a checkpoint, once the runner asked to stop."""


def _recorded_epochs(path: Path) -> set[int]:
    """The epochs earlier attempts of the job recorded (a restored attempt reports again
    the epochs of its checkpoint; those already here are skipped)."""
    epochs = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if row.get("kind") == "epoch":
                epochs.add(int(row["epoch"]))
    return epochs


def _report_to(folder: Path, checkpoint_every: int) -> Any:
    """Reports as JSON lines in ``metrics.jsonl``, each epoch once; each epoch's summary
    also as a line of the log. An epoch that wrote a checkpoint (it is saved before it is
    reported) ends the job if the runner asked it to stop. Each restart the launcher
    spends is written down at once."""
    seen = _recorded_epochs(folder / METRICS)
    out = (folder / METRICS).open("a", buffering=1)
    if out.tell() and not (folder / METRICS).read_bytes().endswith(b"\n"):
        out.write("\n")  # end a line a kill cut short, so this attempt's lines stay whole

    def report(msg: Message) -> None:
        metrics = msg.body.get("metrics") if msg.body else None
        kind = metrics.get("kind") if metrics else None
        if metrics is None:
            return
        if kind == "restart":
            write_atomically(folder / RESTARTS, {"restarts": metrics["restarts"]})
            return
        if kind == "epoch":
            epoch = int(metrics["epoch"])
            if epoch in seen:
                return
            seen.add(epoch)
        if kind in ("epoch", "progress"):
            out.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        if kind == "epoch":
            print(f"epoch {epoch}/{int(metrics['epochs'])} {format_metrics(metrics)}", flush=True)
            restored = metrics.get("restored", False)  # saved before the stop was asked
            if not restored and epoch % checkpoint_every == 0 and (folder / PREEMPT).exists():
                raise _Preempted(f"stopped at its epoch {epoch} checkpoint")

    return report


def check_files(spec: AnyJobSpec) -> None:
    """Refuse at submit what would fail the job as it starts: data that is missing or
    lacks its columns (opened as `corral train` opens it), a ``resume_from`` that is not
    there, a ``checkpoint.dir`` (the service keeps each job's checkpoints itself), and a
    classic job's parameters its library does not know.

    Paths must be absolute, since the job runs in a folder of its own (``corral submit``
    makes them so).

    Raises:
        SpecError: naming the field, in one line.
    """
    resume = spec.resume_from if isinstance(spec, JobSpec) else None
    if isinstance(spec, JobSpec) and spec.checkpoint.dir is not None:
        raise SpecError("checkpoint.dir: the service keeps each job's checkpoints; leave it out")
    sources = {"data": spec.data, "validation": spec.validation}
    if isinstance(spec, JobSpec) and spec.federation is not None:
        del sources["data"]  # each real client brings its own
    paths = {f"{name}.path": Path(d.path) for name, d in sources.items() if d is not None}
    if resume is not None:
        paths["resume_from"] = resume
    for name, path in paths.items():
        if not path.is_absolute():
            raise SpecError(f"{name}: {path} is relative; give an absolute path")
    for name, data in sources.items():
        if data is not None:
            try:
                as_source(data.path, features=data.features, label=data.label)
            except DataError as exc:
                raise SpecError(f"{name}.path: {exc}") from None
    if resume is not None:
        try:
            ckpt.resolve(resume)
        except CheckpointError as exc:
            raise SpecError(str(exc)) from None
    if not isinstance(spec, JobSpec):
        from corral.classic import check

        check(spec, base=Path.cwd())


def run(folder: Path) -> int:
    spec = parse_job(json.loads((folder / SPEC).read_text()), source="spec")
    if spec.tracking is not None:
        spec.tracking = _continued_run(folder, spec.tracking)
    if not isinstance(spec, JobSpec):
        return _run_classic(spec, folder)
    if spec.federation is not None:
        return _run_federated(spec, folder)
    from corral.jobs import trainer_for

    checkpoints = folder / CHECKPOINTS
    spec.checkpoint.dir = checkpoints
    if spec.resume_from is None and ckpt.latest(checkpoints) is not None:
        spec.resume_from = checkpoints
        print(f"resuming from {ckpt.latest(checkpoints)}", flush=True)
    trainer, data, validation = trainer_for(spec, base=folder)
    report = _report_to(folder, spec.checkpoint.every)
    result = trainer.fit(data, validation=validation, on_report=report)
    print(f"done: {json.dumps(result.metrics)}", flush=True)
    return 0


def _run_federated(spec: JobSpec, folder: Path) -> int:
    """A job whose clients are real (``federation``): this process is their aggregator,
    as ``corral fl serve`` runs it. Its rounds are reported as epochs; it keeps its keys,
    port and token (`FEDERATION`, mode 0600, read by the API for the job's team only)
    and a checkpoint each round there, so a restarted attempt resumes on the same
    address, and clients enrol again."""
    from corral.federation.serving import aggregator_for

    aggregator = aggregator_for(spec, base=folder, folder=folder / FEDERATION)
    if aggregator.start_round:
        print(f"resuming at round {aggregator.start_round + 1}", flush=True)
    where = aggregator.address
    # the address's token admits clients: it is in the enrolment file, never in the log
    print(f"serving real clients on {where.host}:{where.port}", flush=True)
    report = _report_to(folder, checkpoint_every=1)
    epochs = float(spec.epochs)

    def on_round(row: dict[str, Any]) -> None:
        metrics = {"kind": "epoch", "epochs": epochs, **row}
        report(Message(role="driver", rank=0, body={"metrics": metrics}))

    history = aggregator.run(on_round)
    print(f"done: {json.dumps(history[-1] if history else {})}", flush=True)
    return 0


def _run_classic(spec: ClassicSpec, folder: Path) -> int:
    """A classic job (`corral.classic`): its rounds reported as a torch job's epochs, its
    model saved in the job's folder. It keeps no checkpoint, so a restarted attempt, or
    one stopped for a preemption (at its next round), fits again from the start."""
    from corral.classic import fit

    report = _report_to(folder, checkpoint_every=1)
    result = fit(
        spec,
        base=folder,
        out=folder,
        on_report=lambda row: report(Message(role="driver", rank=0, body={"metrics": row})),
    )
    print(f"model: {result.path}", flush=True)
    print(f"done: {json.dumps(result.metrics)}", flush=True)
    return 0


def _continued_run(folder: Path, tracking: MLflow) -> MLflow:
    """The job's MLflow run, the same for all its attempts: made by the first and kept in
    `TRACKING` (with its page's address, for the job page), continued by the others."""
    from corral.train.tracking import client_for, open_run, run_url

    try:
        saved = json.loads((folder / TRACKING).read_text())
    except (OSError, ValueError):
        run_id = open_run(tracking, tags={"corral.service_job": folder.name})
        experiment_id = client_for(tracking).get_run(run_id).info.experiment_id
        saved = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "url": run_url(tracking.uri, experiment_id, run_id),
        }
        write_atomically(folder / TRACKING, saved)
    return tracking.model_copy(update={"run_id": saved["run_id"]})


def write_atomically(path: Path, value: dict[str, Any]) -> None:
    """Write `value` as JSON, whole or not at all (a kill mid-write leaves the old file)."""
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def restarts_spent(folder: Path) -> int:
    """The restarts this attempt's launcher spent so far, as `RESTARTS` says (0 if none)."""
    try:
        return int(json.loads((folder / RESTARTS).read_text())["restarts"])
    except (OSError, ValueError, KeyError):
        return 0


def write_exit(folder: Path, status: dict[str, Any]) -> None:
    """Write the exit status whole or not at all (a kill mid-write leaves none)."""
    write_atomically(folder / EXIT, status)


def main() -> None:
    folder = Path(sys.argv[1])
    # Before any thread starts: the job's workers are forks of this, torch imported.
    server = forkserver.ForkServer.fork(WORKER_MODULES, WORKER_PRELOAD)
    forkserver.install(server)
    code, error, restarts, final = 1, None, 0, False
    try:
        code = run(folder)
    except _Preempted as exc:
        code, error = PREEMPTED, str(exc)
        print(f"preempted: {exc}", flush=True)
    except WorkerError as exc:  # the launcher gave up on it, having spent `restarts`
        error, restarts, final = exc.summary, exc.restarts, True
        print(f"error: {exc.summary}\n{exc.remote_traceback or ''}", flush=True)
    except CorralError as exc:
        error, final = str(exc), True
        print(f"error: {exc}", flush=True)
    except KeyboardInterrupt:
        error = "interrupted"
    except SystemExit as exc:  # SIGTERM from the runner (cancel, preemption)
        error = f"stopped (exit {exc.code})"
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # a fault of this process, not of the job: it may restart
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    restarts = max(restarts, restarts_spent(folder))  # also when it ended otherwise
    write_exit(folder, {"code": code, "error": error, "restarts": restarts, "final": final})
    server.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
