"""Where a replay part's state lives: every array it must keep (not its scratch) comes from
an ``Alloc``, and its scalars (a ring's cursor, a count) live in one of those arrays too.

With the default allocator this is plain NumPy. A backend whose worker processes share one
replay passes an allocator that places the arrays in shared memory (runtime.shm_replay), so
the same object, sent to every worker, reads and writes one replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

T = TypeVar("T")


class Alloc(Protocol):
    def __call__(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A zeroed array of ``shape`` and ``dtype``."""
        ...


def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


class MetaSlot(Generic[T]):
    """An attribute stored in element ``index`` of its object's ``meta`` array, read back
    as ``kind`` (int or float)."""

    def __init__(self, index: int, kind: Callable[[Any], T]) -> None:
        self.index, self.kind = index, kind

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        return self.kind(obj.meta[self.index])

    def __set__(self, obj: Any, value: T) -> None:
        obj.meta[self.index] = value
