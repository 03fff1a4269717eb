"""A first-in first-out queue of rollout transitions: the on-policy "replay" of A3C's
queue variant. ``sample(n)`` hands out the oldest n rows and forgets them (each rollout
is trained on once); ``capacity`` bounds how far actors may run ahead of the trainers."""

from __future__ import annotations

from collections import deque

import numpy as np

from qfleet.replay.transitions import Batch, Transitions


class RolloutQueue:
    prioritized = False

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self._capacity, self.rng = capacity, rng
        self.parts: deque[Transitions] = deque()
        self.rows = 0
        self.taken = 0  # rows handed out so far: gives every row a unique index

    def __len__(self) -> int:
        return self.rows

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for p in self.parts for a in p.fields().values())

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        # A copy: a chunk may be a view of a transport slot that its actor reuses.
        self.parts.append(chunk.map(np.array))
        self.rows += len(chunk)
        while self.rows > self._capacity:  # the oldest rollouts are too stale to keep
            self.rows -= len(self.parts.popleft())

    def sample(self, batch_size: int) -> Batch:
        if batch_size > self.rows:
            raise ValueError(f"queue holds {self.rows} rows, {batch_size} asked")
        parts, need = [], batch_size
        while need:
            head = self.parts.popleft()
            if len(head) > need:  # split: the rest stays at the front
                cut = head.rows(slice(None, need))
                self.parts.appendleft(head.rows(slice(need, None)))
                head = cut
            parts.append(head)
            need -= len(head)
        self.rows -= batch_size
        indices_B = np.arange(self.taken, self.taken + batch_size)
        self.taken += batch_size
        return Batch(Transitions.concat(parts), indices_B, None)

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        raise TypeError("a rollout queue has no priorities")

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}  # rollouts are on-policy: a resumed run collects fresh ones

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.parts.clear()
        self.rows = 0
