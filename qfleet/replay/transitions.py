"""The records that flow from actors to replay and from replay to the learner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Transitions:
    """N n-step transitions: ``reward`` is the discounted n-step sum and ``discount`` is
    gamma**k for the k steps folded in, or 0 where the episode terminated (no bootstrap)."""

    obs_NO: np.ndarray
    action_N: np.ndarray
    reward_N: np.ndarray
    discount_N: np.ndarray
    next_obs_NO: np.ndarray

    def __len__(self) -> int:
        return int(self.action_N.shape[0])

    @staticmethod
    def concat(parts: list[Transitions]) -> Transitions:
        return Transitions(*(np.concatenate([getattr(p, name) for p in parts])
                             for name in FIELDS))


FIELDS = ("obs_NO", "action_N", "reward_N", "discount_N", "next_obs_NO")


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
        d = self.data
        return Batch(Transitions(*(getattr(d, name)[rows_B] for name in FIELDS)),
                     self.indices_B[rows_B],
                     None if self.weights_B is None else self.weights_B[rows_B])
