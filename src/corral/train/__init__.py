"""The training layer: `corral.run`, `Trainer`, the launcher and the worker loop.

Users import these from `corral`; this package re-exports nothing, so that importing one
module here does not import the others.
"""
