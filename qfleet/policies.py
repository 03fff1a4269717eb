"""Exploration: a linear epsilon schedule, epsilon-greedy over a batch, the Ape-X ladder,
and sampling from policy logits (actor-critic)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearSchedule:
    start: float
    end: float
    duration: int  # env steps to go from start to end

    def __call__(self, step: int) -> float:
        frac = min(1.0, step / max(1, self.duration))
        return self.start + frac * (self.end - self.start)


@dataclass(frozen=True)
class Constant:
    """A fixed exploration rate (an Ape-X actor's rung, or 0 for a sampling actor)."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


def epsilon_greedy(q_fn: Callable[[], np.ndarray], num_envs: int, num_actions: int,
                   epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy actions from ``q_fn()`` (E x A), each replaced by a uniform random one with
    probability epsilon. The coin flips come first so a step where every env explores
    skips the forward pass (most early steps, when epsilon is near 1)."""
    explore_E = rng.random(num_envs) < epsilon
    random_E = rng.integers(0, num_actions, size=num_envs)
    if explore_E.all():
        return random_E
    return np.where(explore_E, random_E, q_fn().argmax(axis=1))


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
