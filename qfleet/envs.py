"""Environments: Gymnasium ids or ``module:Class``, vectorized, explicitly seeded.

Vector envs use SAME_STEP autoreset so a step that ends an episode returns the
final observation in ``info["final_obs"]`` and the reset observation as ``obs``:
every step is one real transition, which keeps the n-step accumulator simple.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from qfleet.errors import ConfigError

if TYPE_CHECKING:  # config validates env ids through this module: no import back
    from qfleet.config import EnvConfig


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id


def _register_atari() -> None:
    try:
        import ale_py
    except ImportError:
        raise ConfigError("env.id names an Atari game: install ale-py and opencv "
                          "(pip install 'qfleet[atari]')") from None
    gym.register_envs(ale_py)


def _load_class(env_id: str) -> type[gym.Env[Any, Any]]:
    module_name, _, class_name = env_id.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own SyntaxError, NameError, ...
        raise ConfigError(f"env.id = {env_id!r}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, gym.Env)):
        raise ConfigError(f"env.id = {env_id!r}: {module_name}.{class_name} is not a gymnasium.Env "
                          "class")
    return cls


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless ``env_id`` is registered or an importable ``module:Class``."""
    if ":" in env_id:
        _load_class(env_id)
        return
    if is_atari(env_id):
        _register_atari()
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"env.id = {env_id!r}: not a registered Gymnasium id{hint}; "
                          "use a registered id or module:Class")


def _make_one(cfg: EnvConfig, render_mode: str | None = None) -> gym.Env[Any, Any]:
    kwargs: dict[str, Any] = {}
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if ":" in cfg.id:
        env: gym.Env[Any, Any] = _load_class(cfg.id)(**kwargs)
        if cfg.max_episode_steps:
            env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
        return env
    if cfg.max_episode_steps:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    if is_atari(cfg.id):
        _register_atari()
        # Standard DQN preprocessing: the ALE's own frameskip off, AtariPreprocessing does it.
        env = gym.make(cfg.id, frameskip=1, repeat_action_probability=0.0, **kwargs)
        env = gym.wrappers.AtariPreprocessing(env, frame_skip=4, screen_size=84,
                                              terminal_on_life_loss=False, grayscale_obs=True)
        return gym.wrappers.FrameStackObservation(env, cfg.frame_stack)
    return gym.make(cfg.id, **kwargs)


def env_fn(cfg: EnvConfig, render_mode: str | None = None) -> Callable[[], gym.Env[Any, Any]]:
    return lambda: _make_one(cfg, render_mode)


def make_vec_env(cfg: EnvConfig, num_envs: int | None = None) -> SyncVectorEnv:
    """A SAME_STEP-autoreset vector env of ``num_envs`` copies (default ``cfg.num_envs``)."""
    n = num_envs or cfg.num_envs
    env = SyncVectorEnv([env_fn(cfg) for _ in range(n)], autoreset_mode=AutoresetMode.SAME_STEP)
    check_spaces(cfg.id, env.single_observation_space, env.single_action_space)
    return env


def check_spaces(env_id: str, obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> None:
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(f"env.id = {env_id!r}: action space {act_space} is not Discrete; "
                          "DQN needs a discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) not in (1, 3):
        raise ConfigError(f"env.id = {env_id!r}: observation space {obs_space} is not supported; "
                          "allowed: a flat Box (MLP torso) or an image Box (C,H,W) (CNN torso)")


def seeds_for(base_seed: int, stream: int | tuple[int, ...], count: int) -> list[int | None]:
    """Independent, reproducible per-env seeds for one stream (actor i, eval, ...)."""
    seq = np.random.SeedSequence([base_seed, *np.atleast_1d(stream).tolist()])
    return [int(s) for s in seq.generate_state(count)]


def box_space(env: SyncVectorEnv) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Observation shape and dtype of one env (check_spaces already ensured a Box)."""
    space = env.single_observation_space
    assert isinstance(space, gym.spaces.Box)
    return tuple(space.shape), space.dtype


def probe_spaces(cfg: EnvConfig) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(observation shape, observation dtype, number of actions) of ``cfg``'s env, checked."""
    probe = make_vec_env(cfg, num_envs=1)
    try:
        obs_shape, obs_dtype = box_space(probe)
        return obs_shape, obs_dtype, int(probe.single_action_space.n)  # type: ignore[attr-defined]
    finally:
        probe.close()
