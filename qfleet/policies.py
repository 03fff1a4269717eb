"""Exploration: the epsilon schedule, epsilon-greedy draws for a chunk, the Ape-X ladder,
and sampling from policy logits (actor-critic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qfleet.schedules import ramp


@dataclass(frozen=True)
class EpsilonSchedule:
    """The exploration rate from ``start`` to ``end`` over ``duration`` env steps, then flat
    (``kind``: linear, cosine, or constant at ``start``)."""

    start: float
    end: float
    duration: int  # env steps to go from start to end (0 counts as 1)
    kind: str = "linear"

    def __call__(self, step: int) -> float:
        return ramp(self.kind, self.start, self.end, step / max(1, self.duration))


@dataclass(frozen=True)
class Constant:
    """A fixed exploration rate (an Ape-X actor's rung, or 0 for a sampling actor)."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class Exploration:
    """A chunk's exploration draws, made at once: whether each env explores at each step
    (at that step's rate) and the uniform random action it then takes."""

    explore_TE: np.ndarray
    random_TE: np.ndarray

    @classmethod
    def draw(cls, epsilon_T: np.ndarray, num_envs: int, num_actions: int,
             rng: np.random.Generator) -> Exploration:
        steps = len(epsilon_T)
        return cls(rng.random((steps, num_envs)) < epsilon_T[:, None],
                   rng.integers(0, num_actions, size=(steps, num_envs)))

    def all_explore(self, t: int) -> bool:
        """Every env explores at step ``t``: the greedy action is not needed."""
        return bool(self.explore_TE[t].all())

    def actions(self, t: int, q_EA: np.ndarray) -> np.ndarray:
        """Step ``t``'s actions: greedy under ``q_EA`` where the env does not explore."""
        return np.where(self.explore_TE[t], self.random_TE[t], q_EA.argmax(axis=1))


def apex_epsilons(num_actors: int, eps: float = 0.4, alpha: float = 7.0) -> list[float]:
    """Horgan et al. 2018: actor i explores with eps ** (1 + alpha * i / (N - 1))."""
    if num_actors == 1:
        return [eps]
    return [eps ** (1 + alpha * i / (num_actors - 1)) for i in range(num_actors)]


def sample_logits(logits_EA: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row from softmax(logits), by the Gumbel-max trick: drawn from the
    actor's own NumPy stream, so a seeded run samples the same actions every time."""
    gumbel_EA = -np.log(-np.log(rng.random(logits_EA.shape) + 1e-20) + 1e-20)
    return np.asarray((logits_EA + gumbel_EA).argmax(axis=1))
