"""Uniform replay: a ring storage plus a uniform sampler."""

from __future__ import annotations

import numpy as np

from qfleet.replay.base import Storage
from qfleet.replay.transitions import Batch, Transitions


class UniformReplay:
    prioritized = False

    def __init__(self, storage: Storage, rng: np.random.Generator) -> None:
        self.storage = storage
        self.rng = rng

    def __len__(self) -> int:
        return self.storage.size

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @property
    def capacity(self) -> int:
        return self.storage.capacity

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        self.storage.add(chunk)  # uniform sampling has no use for priorities

    def sample(self, batch_size: int) -> Batch:
        if self.storage.size == 0:
            raise RuntimeError("cannot sample from an empty replay")
        idx_B = self.storage.uniform_slots(self.rng, batch_size)
        return Batch(self.storage.get(idx_B), idx_B, None)

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        """Uniform replay ignores priorities; the method keeps the learner's loop uniform."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.storage.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.storage.load_state_dict(state)
