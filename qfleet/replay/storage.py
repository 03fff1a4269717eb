"""Preallocated NumPy ring storage: fixed capacity, oldest entries overwritten first."""

from __future__ import annotations

import numpy as np

from qfleet.replay.arrays import Alloc, MetaSlot, zeros
from qfleet.replay.records import RecordSpec, allocate, transition_spec
from qfleet.replay.transitions import Transitions


class RingStorage:
    """Every field of the record spec (transitions plus ``extra``) in one array each."""

    cursor = MetaSlot(0, int)  # next slot to write
    size = MetaSlot(1, int)

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                 extra: RecordSpec | None = None, alloc: Alloc = zeros) -> None:
        self.capacity = capacity
        self.arrays = allocate(transition_spec(obs_shape, obs_dtype, extra), capacity,
                               alloc=alloc)
        self.meta = alloc((2,), np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def add(self, chunk: Transitions) -> np.ndarray:
        """Write a chunk, wrapping around; returns the slots written."""
        n = len(chunk)
        if n > self.capacity:  # only the newest `capacity` survive anyway
            chunk = chunk.rows(slice(-self.capacity, None))
            # The dropped head counts as written, so slot = (number written) % capacity
            # holds for every transition (prioritized replay derives slots from that).
            self.cursor = (self.cursor + n - self.capacity) % self.capacity
            n = self.capacity
        cursor = self.cursor  # (read once: it lives in the meta array)
        slots_N = (cursor + np.arange(n)) % self.capacity
        # At most two contiguous slice copies (split at the wrap): several times faster
        # than a fancy-index write for image chunks.
        head = min(n, self.capacity - cursor)
        for name, src in chunk.fields().items():
            dst = self.arrays[name]
            dst[cursor: cursor + head] = src[:head]
            dst[: n - head] = src[head:]
        self.cursor = (cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return slots_N

    def get(self, slots_B: np.ndarray) -> Transitions:
        return Transitions.from_fields({k: a[slots_B] for k, a in self.arrays.items()})

    def uniform_slots(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Slots drawn uniformly from the stored transitions (slots [0, size) hold them)."""
        return rng.integers(0, self.size, size=batch_size)

    def pop_dropped(self) -> np.ndarray:
        """Slots emptied other than by overwrite since the last call: a plain ring has none."""
        return np.empty(0, dtype=np.int64)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {name: arr[: self.size] if self.size < self.capacity else arr
                 for name, arr in self.arrays.items()}
        state["meta"] = np.array([self.cursor, self.size], dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.cursor, self.size = (int(v) for v in state["meta"])
        for name, arr in self.arrays.items():
            arr[: len(state[name])] = state[name]
