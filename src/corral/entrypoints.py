"""Turning the names users write (``pkg.mod:fn``, ``train.py``, ``file.py:fn``) into code.

A function loaded from a file path lives in a module that workers could not import by
name, so it is registered with cloudpickle to travel by value.
"""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from corral.errors import SpecError


def load_file_module(path: Path) -> ModuleType:
    """Import a Python file as a module whose functions travel to workers by value."""
    name = f"corral_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)  # workers cannot import it by name
    return module


def load_callable(ref: str, *, base: Path | None = None, what: str = "entrypoint") -> Any:
    """Load ``module:attr``, ``path/to/file.py:attr``, or ``path/to/parts.pkl:key`` (a
    cloudpickled mapping: the Python objects of a `Trainer` that `corral.tune` searches);
    paths are relative to `base`, and modules are found there (default: the current
    folder) before anywhere else."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"{what}: '{ref}' is not a 'module:attribute' reference")
    if target.endswith(".pkl"):
        path = Path(target) if base is None else base / target
        try:
            parts = cloudpickle.loads(path.read_bytes())
        except OSError as exc:
            raise SpecError(f"{what}: cannot read {path}: {exc.strerror}") from None
        if attr not in parts:
            raise SpecError(f"{what}: {path} holds no '{attr}'")
        return parts[attr]
    if target.endswith(".py"):
        path = Path(target) if base is None else base / target
        if not path.is_file():
            raise SpecError(f"{what}: file {path} does not exist")
        module = load_file_module(path)
    else:
        # as ``python -m`` does: a module beside the job (or in the current folder) imports
        # by name, in workers too, which get this process's import path
        folder = str((base or Path.cwd()).resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(f"{what}: cannot import module '{target}': {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{what}: '{target}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


@dataclass
class Script:
    """Run a Python file as ``__main__`` with `args` as its command line, in a worker."""

    path: str
    args: list[str] = field(default_factory=list)

    def __call__(self) -> None:
        sys.argv = [self.path, *self.args]
        sys.path.insert(0, str(Path(self.path).resolve().parent))
        runpy.run_path(self.path, run_name="__main__")


def script_or_callable(target: str, args: list[str]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """What ``corral run TARGET -- ARGS`` runs: a script with argv, or ``fn(*args)``."""
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise SpecError(f"script {target} does not exist")
        return Script(target, list(args)), ()
    fn = load_callable(target)
    if not callable(fn):
        raise SpecError(f"entrypoint: '{target}' is not callable")
    return fn, tuple(args)
