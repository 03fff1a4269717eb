"""Greedy evaluation: whole episodes, batched across envs, seeded apart from training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from qfleet.config import ConfigError, EnvConfig
from qfleet.envs import env_fn, make_vec_env, reset_vec_env, seeds_for

EVAL_STREAM = 999_983  # seed stream of eval envs, far from the actors' streams
MAX_PARALLEL = 20


class EvalInterrupted(Exception):
    """``should_stop`` said so (a Ctrl-C): the evaluation was abandoned mid-episode."""


@dataclass
class EvalResult:
    returns: list[float]
    lengths: list[int] = field(default_factory=list)  # env steps of each episode

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))

    @property
    def length_mean(self) -> float | None:
        return float(np.mean(self.lengths)) if self.lengths else None


@torch.no_grad()
def _greedy(net: nn.Module, obs_EO: np.ndarray) -> np.ndarray:
    device = next(net.parameters()).device
    return net(torch.as_tensor(obs_EO, device=device)).argmax(dim=1).cpu().numpy()


def evaluate(net: nn.Module, env_cfg: EnvConfig, episodes: int, seed: int,
             should_stop: Callable[[], bool] = lambda: False,
             epsilon: float = 0.0) -> EvalResult:
    """Run ``episodes`` greedy episodes (``epsilon``: each action random with that chance,
    drawn from the eval's own seeded stream); each env in a wave counts only its first
    episode, so short episodes are not over-represented. ``should_stop`` is asked every
    step: True abandons the evaluation (EvalInterrupted)."""
    result = EvalResult([], [])
    seeds = seeds_for(seed, EVAL_STREAM, episodes)
    rng = np.random.default_rng([seed, EVAL_STREAM])
    was_training = net.training
    net.eval()
    try:
        while (done := len(result.returns)) < episodes:
            wave = min(MAX_PARALLEL, episodes - done)
            returns, lengths = _wave(net, env_cfg, seeds[done: done + wave], should_stop,
                                     Explore(epsilon, rng))
            result.returns += returns
            result.lengths += lengths
    finally:
        net.train(was_training)
    return result


@dataclass
class Explore:
    """An evaluation's exploration: each action random with chance ``epsilon``."""

    epsilon: float
    rng: np.random.Generator

    def __call__(self, action_E: np.ndarray, num_actions: int) -> np.ndarray:
        if self.epsilon == 0.0:
            return action_E  # greedy: no draw, so greedy evals stay as they were
        random_E = self.rng.random(len(action_E)) < self.epsilon
        return np.where(random_E, self.rng.integers(num_actions, size=len(action_E)),
                        action_E)


def _wave(net: nn.Module, env_cfg: EnvConfig, seeds: list[int | None],
          should_stop: Callable[[], bool], explore: Explore) -> tuple[list[float], list[int]]:
    """One episode in each of ``len(seeds)`` envs stepped together: returns and lengths."""
    env = make_vec_env(env_cfg, num_envs=len(seeds))
    try:
        obs_EO, _ = reset_vec_env(env, seeds)
        space = env.single_action_space
        num_actions = int(space.n) if isinstance(space, gym.spaces.Discrete) else 0
        ret_E, alive_E = np.zeros(len(seeds)), np.ones(len(seeds), dtype=bool)
        len_E = np.zeros(len(seeds), dtype=np.int64)
        while alive_E.any():
            if should_stop():
                raise EvalInterrupted
            action_E = explore(_greedy(net, obs_EO), num_actions)
            obs_EO, reward_E, term_E, trunc_E, _ = env.step(action_E)
            ret_E += reward_E * alive_E
            len_E += alive_E
            alive_E &= ~(term_E | trunc_E)
        return [float(r) for r in ret_E], [int(n) for n in len_E]
    finally:
        env.close()


def record_video(net: nn.Module, env_cfg: EnvConfig, episodes: int, seed: int,
                 video_dir: Path, max_frames: int | None = None) -> EvalResult:
    """Greedy episodes one at a time through Gymnasium's RecordVideo (needs rgb_array);
    ``max_frames`` cuts each video short (the episodes still run to their end)."""
    try:
        base = env_fn(env_cfg, render_mode="rgb_array")()
    except TypeError as err:  # a class or function that takes no render_mode
        raise ConfigError(f"--video: env {env_cfg.id!r} cannot render rgb_array frames "
                          f"({err})") from None
    if "rgb_array" not in base.metadata.get("render_modes", []):
        base.close()
        raise ConfigError(f"--video: env {env_cfg.id!r} cannot render rgb_array frames "
                          f"(render modes: {base.metadata.get('render_modes', [])})")
    try:
        env = gym.wrappers.RecordVideo(base, str(video_dir), episode_trigger=lambda _: True,
                                       video_length=max_frames or 0, disable_logger=True)
    except gym.error.DependencyNotInstalled:
        base.close()
        raise ConfigError("--video needs moviepy: pip install 'qfleet[video]'") from None
    returns = []
    for seed_i in seeds_for(seed, EVAL_STREAM, episodes):
        obs, _ = env.reset(seed=seed_i)
        done, total = False, 0.0
        while not done:
            action = int(_greedy(net, np.asarray(obs)[None])[0])
            obs, reward, term, trunc, _ = env.step(action)
            total += float(reward)
            done = term or trunc
        returns.append(total)
    env.close()
    return EvalResult(returns)
