"""Checkpoint files: atomic writes, a marker that says "this is corral's", and retention.

A checkpoint is a ``torch.save`` of a plain dict (tensors, numbers, strings, lists), so it
is read back with ``weights_only=True``: loading a checkpoint never runs pickled code.
Files are written to a temporary name and renamed, so a full disk or a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from corral.errors import CheckpointError

#: Key present in every corral checkpoint, holding the format version.
MARKER = "corral_checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def save(directory: Path, index: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write ``checkpoint-<index>.pt`` atomically and delete all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint-{index:06d}.pt"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({MARKER: FORMAT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except Exception as exc:  # full disk, unpicklable state…: the old checkpoints stay
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}") from exc
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    """The newest checkpoint in `directory`, or ``None`` if there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve(path: str | os.PathLike[str]) -> Path:
    """Turn a user's ``resume_from`` (a file, or a folder of checkpoints) into one file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"resume_from: {p} does not exist")
    if p.is_dir():
        found = latest(p)
        if found is None:
            raise CheckpointError(f"resume_from: {p} holds no corral checkpoint-*.pt files")
        return found
    return p


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`; anything else raises `CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a corral checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or MARKER not in state:
        raise CheckpointError(f"{path} is not a corral checkpoint (no '{MARKER}' key)")
    if state[MARKER] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state[MARKER]}; this corral reads {FORMAT_VERSION}"
        )
    return state
