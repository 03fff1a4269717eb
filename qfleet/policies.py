"""Exploration: a linear epsilon schedule, epsilon-greedy over a batch, the Ape-X ladder."""

from __future__ import annotations

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


def epsilon_greedy(q_EA: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy actions, each replaced by a uniform random one with probability epsilon."""
    action_E = q_EA.argmax(axis=1)
    explore_E = rng.random(len(action_E)) < epsilon
    if explore_E.any():
        action_E[explore_E] = rng.integers(0, q_EA.shape[1], size=int(explore_E.sum()))
    return action_E


def apex_epsilons(num_actors: int, eps: float = 0.4, alpha: float = 7.0) -> list[float]:
    """Horgan et al. 2018: actor i explores with eps ** (1 + alpha * i / (N - 1))."""
    if num_actors == 1:
        return [eps]
    return [eps ** (1 + alpha * i / (num_actors - 1)) for i in range(num_actors)]
