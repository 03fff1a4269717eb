"""The two interfaces every replay part is written against.

A *storage* keeps transitions in preallocated slots (a plain ring, or deduplicated
frames); a *replay* decides which slots to sample and with what weights. Any replay
works over any storage.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qfleet.replay.transitions import Batch, Transitions


class Storage(Protocol):
    """Fixed-capacity slots; writes go to slot ``(number written so far) % capacity``."""

    capacity: int
    size: int

    @property
    def nbytes(self) -> int: ...

    def add(self, chunk: Transitions) -> np.ndarray:
        """Write a chunk; returns the slots written, oldest first."""
        ...

    def get(self, slots_B: np.ndarray) -> Transitions: ...

    def uniform_slots(self, rng: np.random.Generator, batch_size: int) -> np.ndarray: ...

    def pop_dropped(self) -> np.ndarray:
        """Slots that stopped holding a valid transition other than by being overwritten
        (e.g. their frames were recycled) since the last call."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class Replay(Protocol):
    """What actors write to and learners sample from (uniform, prioritized or sharded)."""

    prioritized: bool
    rng: np.random.Generator

    def __len__(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        """``shard`` names the writer (sharded replay keeps one shard per writer; others
        ignore it)."""
        ...

    def sample(self, batch_size: int) -> Batch: ...

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...
