"""A user's own environment, as the "Your own environment" tests use it: a class that takes
keyword arguments, Discrete observations, a Gymnasium id this module registers on import
(the ``custom_envs:qfleet-tests/Corridor-v0`` form), a factory function and wrappers.

conftest.py puts tests/ on ``sys.path``, so ``custom_envs`` imports in spawned workers too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gymnasium as gym

REGISTERED_ID = "qfleet-tests/Corridor-v0"
MARKS_ENV = "QFLEET_TEST_WRAPPER_MARKS"  # a file each marking wrapper appends a line to


class Corridor(gym.Env[int, int]):
    """Cells 0..length-1, observed as the cell index (Discrete). Action 1 steps right,
    0 steps left (floored at 0); reaching the last cell ends the episode with ``reward``."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(self, length: int = 4, reward: float = 1.0,
                 render_mode: str | None = None) -> None:
        self.length, self.reward = length, reward
        self.observation_space = gym.spaces.Discrete(length)
        self.action_space = gym.spaces.Discrete(2)
        self.pos = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        super().reset(seed=seed)
        self.pos = 0
        return self.pos, {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        self.pos = min(self.length - 1, self.pos + 1) if int(action) == 1 \
            else max(0, self.pos - 1)
        done = self.pos == self.length - 1
        return self.pos, self.reward if done else 0.0, done, False, {}


gym.register(REGISTERED_ID, entry_point=Corridor, max_episode_steps=50)


def make_corridor(length: int = 4, render_mode: str | None = None) -> Corridor:
    """A factory function: what ``qfleet.train(cfg, env_fn=make_corridor)`` is given."""
    return Corridor(length=length)


def _mark(env: gym.Env[Any, Any], name: str) -> gym.Env[Any, Any]:
    path = os.environ.get(MARKS_ENV)
    if path:  # one line per env built: which wrapper, in which process
        with Path(path).open("a") as fh:
            fh.write(f"{name} {os.getpid()}\n")
    return env


def mark_first(env: gym.Env[Any, Any]) -> gym.Env[Any, Any]:
    return _mark(env, "first")


def mark_second(env: gym.Env[Any, Any]) -> gym.Env[Any, Any]:
    return _mark(env, "second")


def reward_times_ten(env: gym.Env[Any, Any]) -> gym.Env[Any, Any]:
    return gym.wrappers.TransformReward(env, lambda r: 10.0 * r)
