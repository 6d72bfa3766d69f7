"""Where processes run: local subprocesses (the default) or a Spark barrier stage."""

from corral.engines.base import Engine, Exit, Plan, ProcessSpec, WorkerGroup
from corral.engines.local import LocalEngine
from corral.errors import SpecError

__all__ = [
    "Engine",
    "Exit",
    "LocalEngine",
    "Plan",
    "ProcessSpec",
    "WorkerGroup",
    "resolve",
]


def resolve(engine: Engine | str | None) -> Engine:
    """An engine from what a user may pass: an `Engine`, ``"local"``, ``"spark"`` or None.

    ``"spark"`` uses the active SparkSession (or starts a local one sized to the job);
    pyspark is imported only then.
    """
    if isinstance(engine, Engine):
        return engine
    if engine is None or engine == "local":
        return LocalEngine()
    if engine == "spark":
        from corral.engines.spark import SparkEngine

        return SparkEngine()
    raise SpecError(f"engine: unknown engine {engine!r}; allowed: 'local', 'spark' or an Engine")
