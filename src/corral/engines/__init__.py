"""Where processes run: local subprocesses now, a Spark barrier stage next."""

from corral.engines.base import Engine, Exit, Plan, ProcessSpec, Resources, WorkerGroup
from corral.engines.local import LocalEngine

__all__ = ["Engine", "Exit", "LocalEngine", "Plan", "ProcessSpec", "Resources", "WorkerGroup"]
