"""Small tensor helpers every layer uses."""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable

import torch


def add_all(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """`values[0] + values[1] + ...`, in that order (Python's `sum` would start from the int 0, which the
    type checker cannot tell from a tensor); ValueError when there is none."""
    items = list(values)
    if not items:
        raise ValueError("add_all needs at least one tensor")
    return functools.reduce(operator.add, items)
