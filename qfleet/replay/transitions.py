"""The records that flow from actors to replay and from replay to the learner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qfleet.replay import frame_codec

# The fields every transition has (the losses read them); a program may declare more
# (records.transition_spec), which travel in ``extra``.
FIELDS = ("obs_NO", "action_N", "reward_N", "discount_N", "next_obs_NO")


@dataclass
class Transitions:
    """N n-step transitions: ``reward`` is the discounted n-step sum and ``discount`` is
    gamma**k for the k steps folded in, or 0 where the episode terminated (no bootstrap).
    ``extra``: the program's further per-row fields, carried along unread by the runtime."""

    obs_NO: np.ndarray
    action_N: np.ndarray
    reward_N: np.ndarray
    discount_N: np.ndarray
    next_obs_NO: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.action_N.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray's object store, queues) with each distinct frame of its frame
        stacks once (replay.frame_codec)."""
        if frame_codec.is_stacked(self.obs_NO.shape[1:], self.obs_NO.dtype):
            rows, frames_KHW = frame_codec.encode(self.fields())
            return {"rows": rows, "frames_KHW": frames_KHW}
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "frames_KHW" in state:
            state = Transitions.from_fields(
                frame_codec.decode(state["rows"], state["frames_KHW"])).__dict__
        self.__dict__.update(state)

    def fields(self) -> dict[str, np.ndarray]:
        """Every field by name, the fixed ones first."""
        return {name: getattr(self, name) for name in FIELDS} | self.extra

    @staticmethod
    def from_fields(arrays: dict[str, np.ndarray]) -> Transitions:
        o, a, r, d, n = (arrays[name] for name in FIELDS)
        return Transitions(o, a, r, d, n, {k: v for k, v in arrays.items() if k not in FIELDS})

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Transitions:
        """``fn`` applied to every field (slicing, indexing, copying rows)."""
        return Transitions.from_fields({k: fn(v) for k, v in self.fields().items()})

    def rows(self, index: slice | np.ndarray) -> Transitions:
        """The rows ``index`` selects, every field alike."""
        return Transitions.from_fields({k: v[index] for k, v in self.fields().items()})

    @staticmethod
    def concat(parts: list[Transitions]) -> Transitions:
        each = [p.fields() for p in parts]
        return Transitions.from_fields({name: np.concatenate([f[name] for f in each])
                                        for name in each[0]})


@dataclass
class Batch:
    """A sampled batch: the transitions, where they came from, and IS weights (None if uniform)."""

    data: Transitions
    indices_B: np.ndarray
    weights_B: np.ndarray | None

    def __len__(self) -> int:
        return len(self.indices_B)

    def take(self, rows_B: np.ndarray) -> Batch:
        """The rows ``rows_B`` of this batch, in that order."""
        return Batch(self.data.rows(rows_B), self.indices_B[rows_B],
                     None if self.weights_B is None else self.weights_B[rows_B])
