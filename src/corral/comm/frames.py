"""Framing of tensors as raw buffers on ZeroMQ multipart messages (no pickle on the hot path).

A message is ``[header, buffer, buffer, …]``: the header is a small JSON object that also
lists each buffer's dtype and shape; each buffer is the array's memory, sent without a copy
(``copy=False``) and received as a NumPy view of the frame.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def pack(header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """The frames of one message: JSON header, then each array's raw (contiguous) memory."""
    flat = [np.ascontiguousarray(a) for a in arrays]
    meta = {**header, "buffers": [[a.dtype.str, list(a.shape)] for a in flat]}
    return [json.dumps(meta).encode(), *(a.reshape(-1).view(np.uint8).data for a in flat)]


def unpack(frames: list[Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Header and arrays of a message; arrays are read-only views of the received frames."""
    header = json.loads(bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]))
    specs = header.pop("buffers", [])
    if len(specs) != len(frames) - 1:
        raise ValueError(f"message announces {len(specs)} buffers but carries {len(frames) - 1}")
    arrays = []
    for (dtype, shape), frame in zip(specs, frames[1:], strict=True):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        arrays.append(np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape))
    return header, arrays
