"""An environment that fails on purpose inside a Ray actor, for the Ray backend's tests."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import ray


class ExplodingInRayActor(gym.Env[np.ndarray, int]):
    """Steps fine in the driver (so the run can be built) and raises inside a Ray actor."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space: gym.spaces.Space[int] = gym.spaces.Discrete(2)  # type: ignore[assignment]

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.zeros(4, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            raise RuntimeError("boom from inside the env, in a Ray actor")
        return np.zeros(4, np.float32), 0.0, False, False, {}
