"""Atari with the DQN protocol (Mnih et al. 2015; Ape-X): frame skip 4 with max-pooling,
84x84 gray, 4 frames stacked, no-op starts, fire reset, and for training only a terminal
at each life loss and rewards clipped to their sign. Metrics and evaluation score whole
games with the game's own reward.

Two paths build the same env. ale-py's ``AtariVectorEnv`` (C++ threads, the default:
``env.vector = "auto"``) and Gymnasium's wrappers on a ``SyncVectorEnv`` (the reference,
``env.vector = "gymnasium"``; also every single env: eval videos, a loaded policy). For
the same seed and actions they give the same frames, rewards and ends (tests/test_atari.py)
except where each draws its own random numbers: the number of no-ops at a start and which
steps repeat an action under sticky actions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from qfleet.errors import ConfigError

if TYPE_CHECKING:
    from qfleet.config import EnvConfig

FIRE = 1  # the ALE's action id for FIRE in every minimal action set that has it
# env.kwargs that AtariVectorEnv takes (the rest of a Gymnasium Atari id's kwargs it does not)
ALE_VECTOR_KWARGS = ("repeat_action_probability", "full_action_space",
                     "max_num_frames_per_episode")
FRAME_SKIP = 4


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id


def register() -> None:
    try:
        import ale_py
    except ImportError:
        raise ConfigError("env.id names an Atari game: install ale-py and opencv "
                          "(pip install 'qfleet[atari]')") from None
    gym.register_envs(ale_py)


PROTOCOL_FIELDS = ("terminal_on_life_loss", "clip_reward")  # None = on for ALE ids


def check_protocol_fields(cfg: EnvConfig) -> None:
    """The training-only Atari settings, set on an env that is not an ALE id: say so."""
    for name in PROTOCOL_FIELDS:
        value = getattr(cfg, name)
        if value is not None and (cfg.fn is not None or not is_atari(cfg.id)):
            raise ConfigError(f"env.{name} = {str(value).lower()}: only ALE ids "
                              f"(ALE/<Game>-v5, <Game>NoFrameskip-v4) take it; env.id = "
                              f"{cfg.id!r}; remove it (for another env, an env.wrappers "
                              "function can do the same)")


def uses_ale_vector(cfg: EnvConfig) -> bool:
    """Whether ``cfg``'s training and eval envs are ale-py's AtariVectorEnv (checked)."""
    if cfg.vector == "gymnasium":
        return False
    refusal = _ale_vector_refusal(cfg)
    if refusal and cfg.vector == "ale":
        raise ConfigError(f"env.vector = 'ale': {refusal}; use env.vector = 'gymnasium' "
                          "(or 'auto')")
    return not refusal


def _ale_vector_refusal(cfg: EnvConfig) -> str:
    if cfg.fn is not None or ":" in cfg.id or not is_atari(cfg.id):
        return f"env.id = {cfg.id!r} is not an ALE id (ALE/<Game>-v5, <Game>NoFrameskip-v4)"
    if cfg.wrappers:
        return f"env.wrappers = {cfg.wrappers!r} wrap one Gymnasium env at a time"
    if cfg.frame_stack != 4:
        return f"env.frame_stack = {cfg.frame_stack}: AtariVectorEnv stacks 4"
    unknown = sorted(set(cfg.kwargs) - set(ALE_VECTOR_KWARGS))
    if unknown:
        return (f"env.kwargs {unknown} are not AtariVectorEnv's (it takes "
                f"{', '.join(ALE_VECTOR_KWARGS)})")
    return ""


def _game_kwargs(cfg: EnvConfig) -> dict[str, Any]:
    """The id's own settings (sticky actions 0.25 for v5 ids), then env.kwargs over them."""
    register()
    spec_kwargs = dict(gym.spec(cfg.id).kwargs)
    return {**spec_kwargs, **cfg.kwargs}


def ale_vector_env(cfg: EnvConfig, num_envs: int, training: bool) -> VectorEnv:
    game_kwargs = _game_kwargs(cfg)
    kwargs = {key: game_kwargs[key] for key in ALE_VECTOR_KWARGS if key in game_kwargs}
    from ale_py.vector_env import AtariVectorEnv

    class SeededAtariVectorEnv(AtariVectorEnv):
        """Takes a list of seeds as every Gymnasium vector env does (the ALE's are int32)."""

        def reset(self, *, seed: Any = None, options: Any = None) -> Any:
            if isinstance(seed, (list, tuple)):
                seed = np.asarray(seed, dtype=np.int64) % 2**31
            return super().reset(seed=seed, options=options)

    env: VectorEnv = SeededAtariVectorEnv(
        game_kwargs["game"], num_envs, num_threads=min(num_envs, os.cpu_count() or 1),
        autoreset_mode=AutoresetMode.SAME_STEP, frameskip=FRAME_SKIP, stack_num=4,
        noop_max=cfg.noop_max, use_fire_reset=cfg.fire_reset, reward_clipping=False,
        life_loss_info=training and cfg.terminal_on_life_loss is not False, **kwargs)
    return StepLimit(env, cfg.max_episode_steps) if cfg.max_episode_steps else env


def gym_env(cfg: EnvConfig, env_id: str, kwargs: dict[str, Any], training: bool,
            make: Any) -> gym.Env[Any, Any]:
    """One env through Gymnasium's wrappers; ``make`` is gym.make (errors named for config)."""
    register()
    base = make(env_id, **{**kwargs, "frameskip": 1})  # AtariPreprocessing skips frames
    env: gym.Env[Any, Any] = NoopFireReset(base, cfg.noop_max, cfg.fire_reset)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=0, frame_skip=FRAME_SKIP,
                                          screen_size=84, grayscale_obs=True)
    # Zero padding at a start, as AtariVectorEnv (its stack holds no earlier frame).
    env = gym.wrappers.FrameStackObservation(env, cfg.frame_stack, padding_type="zero")
    if cfg.max_episode_steps:  # agent steps, as AtariVectorEnv counts them
        env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
    if training and cfg.terminal_on_life_loss is not False:
        env = LifeLossTerminal(env)
    return env


class NoopFireReset(gym.Wrapper[Any, Any, Any, Any]):
    """A start as AtariVectorEnv makes one: 0..noop_max one-frame no-ops (a game that ends
    in them starts again), then one frame of FIRE where the game has it."""

    def __init__(self, env: gym.Env[Any, Any], noop_max: int, fire: bool) -> None:
        super().__init__(env)
        meanings = env.unwrapped.get_action_meanings()  # type: ignore[attr-defined]
        self.noop_max, self.fire = noop_max, fire and "FIRE" in meanings

    def reset(self, **kwargs: Any) -> Any:
        obs, info = self.env.reset(**kwargs)
        ale = self.env.unwrapped.ale  # type: ignore[attr-defined]
        for _ in range(int(self.np_random.integers(0, self.noop_max + 1))):
            ale.act(0)
            if ale.game_over():
                obs, info = self.env.reset()
        if self.fire:
            obs, _, _, _, info = self.env.step(FIRE)
        return obs, info


class LifeLossTerminal(gym.Wrapper[Any, Any, Any, Any]):
    """A lost life ends the training episode but not the game: the next reset continues
    from where the life was lost (what AtariVectorEnv's ``life_loss_info`` does)."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.lives = 0
        self.held: tuple[Any, Any] | None = None  # (obs, info) when a life, not the game, ended

    def reset(self, **kwargs: Any) -> Any:
        if self.held is not None:
            held, self.held = self.held, None
            return held
        obs, info = self.env.reset(**kwargs)
        self.lives = info["lives"]
        return obs, info

    def step(self, action: Any) -> Any:
        obs, reward, term, trunc, info = self.env.step(action)
        lost = info["lives"] < self.lives
        self.lives = info["lives"]
        if lost and not (term or trunc):
            self.held = (obs, info)
            term = True
        return obs, reward, term, trunc, info


class GameScores(gym.vector.VectorWrapper):
    """Training's rewards and ends, with the game's own beside them: ``info["game_reward"]``
    (unclipped) and ``info["game_over"]`` (the game reset, not only a life lost), which the
    actor's metrics count. A game ended when its frame counter went back."""

    def __init__(self, env: VectorEnv, clip_reward: bool) -> None:
        super().__init__(env)
        self.clip_reward = clip_reward
        self.frame_E = np.zeros(env.num_envs, dtype=np.int64)

    def reset(self, **kwargs: Any) -> Any:
        obs, info = self.env.reset(**kwargs)
        self.frame_E = np.asarray(info["episode_frame_number"], dtype=np.int64)
        return obs, info

    def step(self, actions: Any) -> Any:
        obs, reward_E, term_E, trunc_E, info = self.env.step(actions)
        info["game_over"], self.frame_E = _game_reset(info, self.frame_E)
        # A life lost, the game going on: the next obs is the episode's last. ale-py 0.12.1
        # leaves final_obs unwritten there (stale bytes), so it is set here on both paths.
        for e in np.flatnonzero((term_E | trunc_E) & ~info["game_over"]):
            info["final_obs"][e] = obs[e]
        info["game_reward"] = np.asarray(reward_E, dtype=np.float64)
        if self.clip_reward:
            reward_E = np.sign(reward_E)
        return obs, reward_E, term_E, trunc_E, info


def _game_reset(info: dict[str, Any], frame_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which envs' games started again this step, the frame counters now)."""
    now_E = np.asarray(info["episode_frame_number"], dtype=np.int64)
    return now_E < frame_E, now_E


class StepLimit(gym.vector.VectorWrapper):
    """env.max_episode_steps on AtariVectorEnv in agent steps, as Gymnasium's TimeLimit
    counts them (the ALE's own limit counts frames, start frames included). Lives lost
    before the limit do not restart the count; a game cut short starts again at once."""

    def __init__(self, env: VectorEnv, max_steps: int) -> None:
        super().__init__(env)
        self.max_steps = max_steps
        self.steps_E = np.zeros(env.num_envs, dtype=np.int64)
        self.frame_E = np.zeros(env.num_envs, dtype=np.int64)

    def reset(self, **kwargs: Any) -> Any:
        obs, info = self.env.reset(**kwargs)
        self.steps_E[:] = 0
        self.frame_E = np.asarray(info["episode_frame_number"], dtype=np.int64)
        return obs, info

    def step(self, actions: Any) -> Any:
        obs, reward_E, term_E, trunc_E, info = self.env.step(actions)
        restarted_E, self.frame_E = _game_reset(info, self.frame_E)
        self.steps_E = np.where(restarted_E, 0, self.steps_E + 1)
        cut_E = self.steps_E >= self.max_steps
        if cut_E.any():
            final = info.get("final_obs")
            info["final_obs"] = np.array(obs) if final is None else final
            info["final_obs"][cut_E] = obs[cut_E]
            obs, reset_info = self.env.reset(options={"reset_mask": cut_E})
            info["episode_frame_number"] = reset_info["episode_frame_number"]
            self.frame_E = np.asarray(reset_info["episode_frame_number"], dtype=np.int64)
            term_E = term_E & ~cut_E  # a life lost at the limit: the game is cut, not over
            trunc_E = trunc_E | cut_E
            self.steps_E[cut_E] = 0
        return obs, reward_E, term_E, trunc_E, info
