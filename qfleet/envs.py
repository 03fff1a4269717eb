"""Environments: Gymnasium ids, ``module:EnvId``, ``module:Class`` or a Python function;
``env.kwargs`` and ``env.wrappers``; vectorized, explicitly seeded.

One function, ``make_env``, builds every env qfleet steps (actors, eval, video, a loaded
policy's ``make_env``): the base env, Atari preprocessing for Atari ids, MinAtar's frames
channels-first, the user's wrappers in order, then a one-hot encoding of Discrete
observations (so an MLP can take them).

Vector envs use SAME_STEP autoreset so a step that ends an episode returns the
final observation in ``info["final_obs"]`` and the reset observation as ``obs``:
every step is one real transition, which keeps the n-step accumulator simple.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv

from qfleet import atari
from qfleet.atari import is_atari
from qfleet.errors import ConfigError

if TYPE_CHECKING:  # config validates env ids through this module: no import back
    from qfleet.config import EnvConfig

# env.id of a run whose env came from a function that cannot be imported by name (a lambda,
# a closure, a function of __main__): the config names it, qfleet.train's env_fn builds it.
ENV_FN = "<env_fn>"


def is_minatar(env_id: str) -> bool:
    return env_id.startswith("MinAtar/")


def _register_minatar(env_id: str) -> None:
    if "MinAtar/Breakout-v1" in gym.registry:  # registering again warns once per game
        return
    try:
        from minatar import gym as minatar_gym
    except ImportError:
        raise ConfigError(f"env.id = {env_id!r} names a MinAtar game: install minatar "
                          "(pip install 'qfleet[minatar]')") from None
    minatar_gym.register_envs()


class ChannelsFirst(gym.ObservationWrapper[np.ndarray, Any, Any]):
    """MinAtar's (H, W, C) bool maps as (C, H, W) uint8 0/1: the layout the conv torsos
    take, in a dtype that torch and the replay store as one byte."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        height, width, channels = env.observation_space.shape  # type: ignore[misc]
        self.observation_space = gym.spaces.Box(0, 1, (channels, height, width), np.uint8)

    def observation(self, observation: Any) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(observation, -1, 0), dtype=np.uint8)


def _import(what: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own SyntaxError, NameError, ...
        raise ConfigError(f"{what}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err})") from None


def _attr(module: Any, name: str) -> Any:
    """``module.name`` (a dotted name walks attributes); None if absent or not a name."""
    target = module
    for part in name.split("."):
        if not part.isidentifier():
            return None
        target = getattr(target, part, None)
    return target


def _resolve(env_id: str) -> tuple[str, Any]:
    """``module:X`` -> ("factory", a gymnasium.Env class or a function returning an env) or
    ("id", a Gymnasium id that importing the module registered), as Gymnasium's own
    ``gym.make("module:EnvId")`` does."""
    what = f"env.id = {env_id!r}"
    module_name, _, name = env_id.partition(":")
    module = _import(what, module_name)
    target = _attr(module, name)
    if target is None:
        if name in gym.registry:
            return "id", name
        raise ConfigError(f"{what}: {module_name}.{name} is not a gymnasium.Env class, a "
                          f"function returning one, or a Gymnasium id that importing "
                          f"{module_name!r} registers")
    if inspect.isclass(target) and not issubclass(target, gym.Env):
        raise ConfigError(f"{what}: {module_name}.{name} is not a gymnasium.Env class")
    if not callable(target):
        raise ConfigError(f"{what}: {module_name}.{name} is not a gymnasium.Env class or a "
                          "function returning one")
    return "factory", target


def _check_registered(env_id: str) -> None:
    if is_atari(env_id):
        atari.register()
    if is_minatar(env_id):
        _register_minatar(env_id)
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"env.id = {env_id!r}: not a registered Gymnasium id{hint}; "
                          "use a registered id, module:EnvId or module:Class")


def env_fn_needed(env_id: str) -> ConfigError:
    return ConfigError(f"env.id = {env_id!r}: this run's env was built by a Python function "
                       "that cannot be imported by name; pass the same function again: "
                       "qfleet.load_policy(path, env_fn=...) or "
                       "qfleet.resume(run_dir, env_fn=...)")


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless ``env_id`` is registered, or ``module:EnvId`` /
    ``module:Class`` / ``module:function`` that resolves."""
    if env_id.startswith(ENV_FN):
        raise env_fn_needed(env_id)
    if ":" not in env_id:
        _check_registered(env_id)
    elif (found := _resolve(env_id))[0] == "id":
        _check_registered(found[1])


def _wrapper(index: int, ref: str) -> Callable[[gym.Env[Any, Any]], gym.Env[Any, Any]]:
    what = f"env.wrappers[{index}] = {ref!r}"
    module_name, sep, name = ref.partition(":")
    if not sep or not name:
        raise ConfigError(f"{what}: expected 'module:function'")
    target = _attr(_import(what, module_name), name)
    if not callable(target):
        raise ConfigError(f"{what}: {module_name}.{name} is not a function or class that "
                          "takes an env")
    return target


def check_env(cfg: EnvConfig) -> None:
    """Raise ConfigError unless ``cfg``'s id (when no function builds the env) and every
    wrapper resolve (nothing is built: this is what config validation asks)."""
    if cfg.fn is None:
        check_env_id(cfg.id)
    atari.check_protocol_fields(cfg)
    if cfg.vector == "ale":
        atari.uses_ale_vector(cfg)  # raises where it cannot be
    for index, ref in enumerate(cfg.wrappers):
        _wrapper(index, ref)


def _call(cfg: EnvConfig, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``; a call its signature refuses (env.kwargs it does not
    take, a required one missing) is the config's mistake, not a bug."""
    try:
        return factory(*args, **kwargs)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise ConfigError(f"env.kwargs = {cfg.kwargs!r}: building {cfg.id!r} with them "
                          f"failed (TypeError: {err})") from None


def _registered(env_id: str, cfg: EnvConfig, kwargs: dict[str, Any],
                training: bool) -> gym.Env[Any, Any]:
    if is_atari(env_id):  # the DQN protocol; its time limit counts agent steps
        return atari.gym_env(cfg, env_id, kwargs, training,
                             lambda *args, **kw: _call(cfg, gym.make, *args, **kw))
    if cfg.max_episode_steps:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    if is_minatar(env_id):
        _register_minatar(env_id)
        return ChannelsFirst(_call(cfg, gym.make, env_id, **kwargs))
    return _call(cfg, gym.make, env_id, **kwargs)


def _built(factory: Callable[..., Any], cfg: EnvConfig, kwargs: dict[str, Any]) -> \
        gym.Env[Any, Any]:
    env = _call(cfg, factory, **kwargs)
    if not isinstance(env, gym.Env):
        raise ConfigError(f"env.id = {cfg.id!r}: the function returned "
                          f"{type(env).__name__}, not a gymnasium.Env")
    if cfg.max_episode_steps:
        env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
    return env


def _base_env(cfg: EnvConfig, render_mode: str | None, training: bool) -> gym.Env[Any, Any]:
    kwargs = dict(cfg.kwargs)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if cfg.fn is not None:
        return _built(cfg.fn, cfg, kwargs)
    if ":" not in cfg.id:
        return _registered(cfg.id, cfg, kwargs, training)
    kind, target = _resolve(cfg.id)
    if kind == "id":
        return _registered(target, cfg, kwargs, training)
    return _built(target, cfg, kwargs)


class OneHot(gym.ObservationWrapper[np.ndarray, Any, Any]):
    """Discrete observations (FrozenLake's cell, Taxi's state) as one-hot float32 vectors."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, gym.spaces.Discrete)
        self.n, self.start = int(space.n), int(space.start)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.n,), np.float32)

    def observation(self, observation: Any) -> np.ndarray:
        return one_hot(np.asarray(observation) - self.start, self.n)


def one_hot(index: np.ndarray, n: int) -> np.ndarray:
    """Indices of any shape -> float32 one-hot vectors (shape + (n,))."""
    out = np.zeros((*index.shape, n), dtype=np.float32)
    np.put_along_axis(out, index.astype(np.int64)[..., None], 1.0, axis=-1)
    return out


def make_env(cfg: EnvConfig, render_mode: str | None = None,
             training: bool = False) -> gym.Env[Any, Any]:
    """One env: base env (with env.kwargs), the Atari protocol for Atari ids (life loss
    ends an episode only in ``training``), env.wrappers in order, one-hot Discrete
    observations."""
    env = _base_env(cfg, render_mode, training)
    for index, ref in enumerate(cfg.wrappers):
        env = _wrapper(index, ref)(env)
        if not isinstance(env, gym.Env):
            raise ConfigError(f"env.wrappers[{index}] = {ref!r}: returned "
                              f"{type(env).__name__}, not a gymnasium.Env")
    if isinstance(env.observation_space, gym.spaces.Discrete):
        env = OneHot(env)
    return env


def env_fn(cfg: EnvConfig, render_mode: str | None = None,
           training: bool = False) -> Callable[[], gym.Env[Any, Any]]:
    return lambda: make_env(cfg, render_mode, training)


def make_vec_env(cfg: EnvConfig, num_envs: int | None = None,
                 training: bool = False) -> VectorEnv:
    """A SAME_STEP-autoreset vector env of ``num_envs`` copies (default ``cfg.num_envs``).
    Atari ids: ale-py's AtariVectorEnv unless env.vector says otherwise; in ``training``
    rewards are clipped and a lost life ends an episode (qfleet.atari)."""
    n = num_envs or cfg.num_envs
    game = cfg.fn is None and is_atari(cfg.id.rpartition(":")[2])  # built by qfleet.atari
    env: VectorEnv
    if game and atari.uses_ale_vector(cfg):
        env = atari.ale_vector_env(cfg, n, training)
    else:
        env = SyncVectorEnv([env_fn(cfg, training=training) for _ in range(n)],
                            autoreset_mode=AutoresetMode.SAME_STEP)
    if game and training:  # training's clipped rewards and lives, the games' own beside
        env = atari.GameScores(env, cfg.clip_reward is not False)
    check_spaces(cfg.id, env.single_observation_space, env.single_action_space)
    return env


def reset_vec_env(env: VectorEnv, seeds: list[int | None]) -> tuple[np.ndarray, dict[str, Any]]:
    """Reset with one seed per env (every vector env takes a list; the stubs say int)."""
    return env.reset(seed=seeds)  # type: ignore[arg-type]


def check_spaces(env_id: str, obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> None:
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(f"env.id = {env_id!r}: action space {act_space} is not Discrete; "
                          "DQN needs a discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) not in (1, 3):
        raise ConfigError(f"env.id = {env_id!r}: observation space {obs_space} is not supported; "
                          "allowed: a flat Box (MLP torso), an image Box (C,H,W) (CNN torso) or "
                          "Discrete (one-hot encoded); convert others in an env.wrappers function")


# ---------------------------------------------------------------- qfleet.train(env_fn=...)

def env_fn_ref(fn: Callable[..., Any]) -> tuple[str, bool]:
    """(the env.id that names ``fn``, whether it imports back to ``fn`` by that name).
    A top-level function or class of an importable module is recorded as module:name, so
    the run's config.toml rebuilds it anywhere; anything else is named for the record."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if module != "__main__" and "<" not in name:
        try:
            if _attr(importlib.import_module(module), name) is fn:
                return f"{module}:{name}", True
        except Exception:  # not importable by name: named for the record only
            pass
    return f"{ENV_FN}:{module}.{name}", False


def check_picklable(fn: Callable[..., Any], start_method: str) -> None:
    """Spawned workers receive env_fn by pickle: say so now rather than from inside a
    worker's start."""
    try:
        pickle.dumps(fn)
    except Exception as err:
        raise ConfigError(f"env_fn = {fn!r}: runtime.start_method = {start_method!r} sends it "
                          f"to worker processes by pickle, and it does not pickle "
                          f"({type(err).__name__}: {err}); define it at the top level of an "
                          "importable module, or use runtime.start_method = 'fork'") from None


# ---------------------------------------------------------------- seeds and spaces

def seeds_for(base_seed: int, stream: int | tuple[int, ...], count: int) -> list[int | None]:
    """Independent, reproducible per-env seeds for one stream (actor i, eval, ...)."""
    seq = np.random.SeedSequence([base_seed, *np.atleast_1d(stream).tolist()])
    return [int(s) for s in seq.generate_state(count)]


def box_space(env: VectorEnv) -> tuple[tuple[int, ...], np.dtype[Any]]:
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
