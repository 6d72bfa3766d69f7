"""What a job is fed: sources of training data, split across ranks one epoch at a time.

Example:
    >>> import numpy as np
    >>> from corral.data import as_source
    >>> source = as_source((np.random.rand(8, 3), np.arange(8)))
    >>> source.steps_per_epoch(world_size=2, batch_size=2)
    2
"""

from corral.data.base import Source
from corral.data.sources import as_source

__all__ = ["Source", "as_source"]
