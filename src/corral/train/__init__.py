"""The training layer: `corral.run`, `Trainer`, the worker `Context` and checkpoints.

Users import these from `corral`; this package re-exports nothing so that strategies can
import `corral.train.context` without import cycles.
"""
