"""Tiny Gymnasium environments used as ``env.id = "envs_for_tests:Class"`` in the tests.

conftest.py puts this folder on ``sys.path`` so the ``module:Class`` form resolves.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np


class ChainEnv(gym.Env[np.ndarray, int]):
    """A walk on 0..LENGTH; action 1 steps right, 0 steps left (floored at 0).

    obs = [position, steps taken so far], both exact in float32, so a test can check
    that every transition's next_obs follows from (obs, action) by the dynamics.
    Reaching position LENGTH terminates with reward 1; every other step gives 0.
    """

    LENGTH = 4
    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(self, render_mode: str | None = None) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1e6, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.render_mode = render_mode
        self.pos = 0
        self.steps = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.pos, self.steps], dtype=np.float32)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.pos, self.steps = 0, 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.pos = self.pos + 1 if int(action) == 1 else max(0, self.pos - 1)
        self.steps += 1
        terminated = self.pos >= self.LENGTH
        return self._obs(), float(terminated), terminated, False, {}


class ContinuousActionEnv(gym.Env[np.ndarray, np.ndarray]):
    """Flat observations but a continuous (Box) action space: DQN cannot act in it."""

    def __init__(self, render_mode: str | None = None) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.zeros(3, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        return np.zeros(3, dtype=np.float32), 0.0, True, False, {}


class ImageEnv(gym.Env[np.ndarray, int]):
    """uint8 (4, 84, 84) frames (channels first, like stacked Atari frames), 3 actions,
    episodes of 5 steps."""

    SHAPE = (4, 84, 84)

    def __init__(self, render_mode: str | None = None) -> None:
        self.observation_space = gym.spaces.Box(0, 255, shape=self.SHAPE, dtype=np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.full(self.SHAPE, 10 * self.t, dtype=np.uint8)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self._obs(), float(action), self.t >= 5, False, {}


class SmallImageEnv(ImageEnv):
    """Frames too small for the Nature-CNN (it needs at least 36x36)."""

    SHAPE = (1, 20, 20)


class DictObsEnv(gym.Env[dict[str, np.ndarray], int]):
    """A Dict observation space: neither a flat Box nor an image Box."""

    def __init__(self, render_mode: str | None = None) -> None:
        self.observation_space = gym.spaces.Dict(
            {"x": gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)})
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray],
                                                           dict[str, Any]]:
        super().reset(seed=seed)
        return {"x": np.zeros(2, dtype=np.float32)}, {}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool,
                                         dict[str, Any]]:
        return {"x": np.zeros(2, dtype=np.float32)}, 0.0, True, False, {}


class NotAnEnv:
    """Importable, but not a gymnasium.Env subclass."""


class SlowEnv(ChainEnv):
    """ChainEnv that takes STEP_S of wall time per step and never terminates on its own
    (give it env.max_episode_steps): long evaluations for the Ctrl-C tests."""

    STEP_S = 0.004
    LENGTH = 10**9

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        time.sleep(self.STEP_S)
        return super().step(action)


class ExplodingEnv(ChainEnv):
    """Raises from its 40th step: a bug in user code that a worker must report, whether it
    was forked or spawned (a monkeypatch does not reach a spawned process)."""

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.steps >= 40:
            raise RuntimeError("exploded on purpose")
        return super().step(action)
