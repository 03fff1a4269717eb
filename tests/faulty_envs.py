"""Environments that fail on purpose, to test how workers report errors."""

from __future__ import annotations

import os
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv

MAIN_PID = os.getpid()  # the test process; forked workers inherit the value


class ExplodingEnv(gym.Env[np.ndarray, int]):
    """Works in the main process (so the run can start) and raises inside a worker."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.zeros(4, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if os.getpid() != MAIN_PID:
            raise RuntimeError("boom from inside the env")
        return np.zeros(4, np.float32), 0.0, False, False, {}


class SlowStartCartPole(CartPoleEnv):
    """CartPole, whose first reset inside a worker takes 1 s: a test can look at what the
    main process holds right after the workers started, before any of them acts."""

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if os.getpid() != MAIN_PID and not getattr(self, "_slept", False):
            self._slept = True
            time.sleep(1.0)
        return super().reset(seed=seed, options=options)


class BlockingCartPole(CartPoleEnv):
    """CartPole whose step blocks for an hour once this instance took 200 steps: a worker
    (or an inline run) stuck in its env, for the stall watchdog's tests."""

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._steps = getattr(self, "_steps", 0) + 1
        if self._steps > 200:
            time.sleep(3600.0)
        return super().step(action)


class SlowCartPole(CartPoleEnv):
    """CartPole whose every step takes 2 ms more: actors slower than any learner here."""

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        time.sleep(0.002)
        return super().step(action)
