"""Model factories for bench/tune_asha.py: wider and deeper MLPs on the digits (64 → 10).

A job spec's ``entrypoint`` names a function of no arguments, so the size is in the
name: ``bench/tune_asha_model.py:mlp_<hidden>x<layers>`` is an MLP with `layers` hidden
layers of `hidden` units each, ReLU between them (``mlp_128x1`` is examples/digits.py's
``make_model``). Any such name resolves (a module ``__getattr__``), so the bench's
``--hidden`` and ``--layers`` need no code here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch


def mlp(hidden: int, layers: int) -> torch.nn.Module:
    """64 → `hidden` (× `layers`, ReLU after each) → 10."""
    parts: list[torch.nn.Module] = []
    width = 64
    for _ in range(layers):
        parts += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    parts.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*parts)


def __getattr__(name: str) -> Callable[[], torch.nn.Module]:
    found = re.fullmatch(r"mlp_(\d+)x(\d+)", name)
    if found is None:
        raise AttributeError(name)
    hidden, layers = int(found.group(1)), int(found.group(2))
    if hidden < 1 or layers < 1:
        raise AttributeError(name)

    def make_model() -> torch.nn.Module:
        return mlp(hidden, layers)

    make_model.__name__ = make_model.__qualname__ = name
    return make_model
