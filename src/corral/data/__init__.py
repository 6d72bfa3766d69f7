"""What a job is fed: sources of training data, split across ranks one epoch at a time.

Example:
    >>> import numpy as np
    >>> from corral.data import as_source
    >>> source = as_source((np.random.rand(8, 3), np.arange(8)))
    >>> source.steps_per_epoch(world_size=2, batch_size=2)
    2

`Source` and `as_source` are imported on first use (PEP 562): they need torch, and a
process that only decodes Arrow (`corral.data.arrow`, in a Spark task of a LightGBM job)
should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Source", "as_source"]

_EXPORTS = {"Source": "corral.data.base", "as_source": "corral.data.sources"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'corral.data' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from corral.data.base import Source
    from corral.data.sources import as_source
