"""One attempt of a service job, as its own process: ``python -m corral.service.job DIR``.

The runner writes the validated spec to ``DIR/spec.json`` and starts this process in a
session of its own, its output going to ``DIR/log``. It trains with the same code as
``corral train``. Each report goes to ``DIR/metrics.jsonl`` as a JSON line (epoch rows,
and progress ticks for the live samples/s chart). Checkpoints go to
``DIR/checkpoints``, so an attempt after a failure, or after a server restart, resumes
from the newest one. The exit status goes to ``DIR/exit.json``, because a server that
restarted meanwhile is not this process's parent and cannot wait for it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from corral.comm.control import Message
from corral.errors import CorralError, WorkerError
from corral.spec import JobSpec, parse
from corral.train import checkpoint as ckpt
from corral.train.progress import format_metrics

SPEC, LOG, METRICS, EXIT = "spec.json", "log", "metrics.jsonl", "exit.json"
#: The file the runner writes to ask the job to stop at its next checkpoint (preemption).
PREEMPT = "preempt"
#: The exit code of a job that stopped so.
PREEMPTED = 75


class _Preempted(Exception):
    """Raised on the epoch report after a checkpoint, once the runner asked to stop."""


def _report_to(folder: Path, checkpoint_every: int) -> Any:
    """Reports as JSON lines in ``metrics.jsonl``; each epoch's summary also as a line of
    the log. An epoch that wrote a checkpoint (it is saved before it is reported) ends the
    job if the runner asked it to stop."""
    out = (folder / METRICS).open("a", buffering=1)

    def report(msg: Message) -> None:
        metrics = msg.body.get("metrics") if msg.body else None
        if metrics and metrics.get("kind") in ("epoch", "progress"):
            out.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        if metrics and metrics.get("kind") == "epoch":
            epoch = int(metrics["epoch"])
            print(f"epoch {epoch}/{int(metrics['epochs'])} {format_metrics(metrics)}", flush=True)
            if epoch % checkpoint_every == 0 and (folder / PREEMPT).exists():
                raise _Preempted(f"stopped at its epoch {epoch} checkpoint")

    return report


def run(folder: Path) -> int:
    from corral.jobs import trainer_for

    spec = parse(JobSpec, json.loads((folder / SPEC).read_text()), source="spec")
    checkpoints = folder / "checkpoints"
    spec.checkpoint.dir = checkpoints
    if spec.resume_from is None and ckpt.latest(checkpoints) is not None:
        spec.resume_from = checkpoints
        print(f"resuming from {ckpt.latest(checkpoints)}", flush=True)
    trainer, data, validation = trainer_for(spec, base=folder)
    report = _report_to(folder, spec.checkpoint.every)
    result = trainer.fit(data, validation=validation, on_report=report)
    print(f"done: {json.dumps(result.metrics)}", flush=True)
    return 0


def main() -> None:
    folder = Path(sys.argv[1])
    code, error = 1, None
    try:
        code = run(folder)
    except _Preempted as exc:
        code, error = PREEMPTED, str(exc)
        print(f"preempted: {exc}", flush=True)
    except WorkerError as exc:
        error = exc.summary
        print(f"error: {exc.summary}\n{exc.remote_traceback or ''}", flush=True)
    except CorralError as exc:
        error = str(exc)
        print(f"error: {exc}", flush=True)
    except KeyboardInterrupt:
        error = "interrupted"
    except SystemExit as exc:  # SIGTERM from the runner (cancel, preemption)
        error = f"stopped (exit {exc.code})"
        code = exc.code if isinstance(exc.code, int) else 1
    (folder / EXIT).write_text(json.dumps({"code": code, "error": error}))
    sys.exit(code)


if __name__ == "__main__":
    main()
