"""Atari with the DQN protocol (qfleet.atari): ale-py's AtariVectorEnv and Gymnasium's
wrappers give the same frames for the same seed and actions, training ends an episode at
each lost life and clips rewards, and metrics and evaluation score whole games."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _presets import train_briefly_and_evaluate

from qfleet.config import ConfigError, EnvConfig, load_config
from qfleet.envs import make_vec_env
from qfleet.evaluate import evaluate

pytest.importorskip("ale_py", reason="Atari needs the qfleet[atari] extra")

# What the two paths cannot share: each draws its own no-op counts and sticky repeats.
SAME_DRAWS: dict[str, Any] = {"noop_max": 0, "kwargs": {"repeat_action_probability": 0.0}}


def _both(game: str, num_envs: int, training: bool, **fields: Any) -> tuple[Any, Any]:
    fields = {**SAME_DRAWS, **fields}
    ale = make_vec_env(EnvConfig(id=game, num_envs=num_envs, vector="ale", **fields),
                       training=training)
    gym = make_vec_env(EnvConfig(id=game, num_envs=num_envs, vector="gymnasium", **fields),
                       training=training)
    return ale, gym


def _step_both(ale: Any, gym: Any, steps: int, seed: int) -> dict[str, int]:
    """Step both with the same random actions; every output must agree. Counts the ends."""
    rng = np.random.default_rng(seed)
    seeds = [seed * 10 + k for k in range(ale.num_envs)]
    obs_a, _ = ale.reset(seed=seeds)
    obs_g, _ = gym.reset(seed=seeds)
    assert np.array_equal(obs_a, obs_g)
    counts = {"terminal": 0, "game_over": 0, "big_reward": 0}
    for t in range(steps):
        action_E = rng.integers(ale.single_action_space.n, size=ale.num_envs)
        out_a, out_g = ale.step(action_E), gym.step(action_E)
        for name, a, g in zip(("obs", "reward", "terminated", "truncated"), out_a[:4],
                              out_g[:4], strict=True):
            assert np.array_equal(a, g), f"{name} differs at step {t}"
        info_a, info_g = out_a[4], out_g[4]
        done_E = out_a[2] | out_a[3]
        if done_E.any():
            assert np.array_equal(info_a["final_obs"][done_E], np.stack(
                [info_g["final_obs"][e] for e in np.flatnonzero(done_E)]))
        for key in ("game_over", "game_reward"):
            if key in info_a or key in info_g:
                assert np.array_equal(info_a[key], info_g[key]), f"{key} differs at step {t}"
        counts["terminal"] += int(done_E.sum())
        counts["game_over"] += int(info_a.get("game_over", done_E).sum())
        counts["big_reward"] += int((np.abs(info_a.get("game_reward", 0)) > 1).sum())
    return counts


@pytest.mark.parametrize("limit", [0, 50])
@pytest.mark.parametrize("training", [True, False])
def test_ale_vector_and_gymnasium_wrappers_agree(training: bool, limit: int) -> None:
    """Breakout, random play through several games: fire reset, life losses, game overs;
    with env.max_episode_steps, games cut short in agent steps."""
    ale, gym = _both("ALE/Breakout-v5", 2, training, max_episode_steps=limit)
    try:
        counts = _step_both(ale, gym, 1200, seed=3)
    finally:
        ale.close()
        gym.close()
    assert counts["game_over"] >= (2 * 1200 // limit if limit else 2)
    if not training:  # whole games
        assert counts["terminal"] == counts["game_over"]
    elif not limit:  # 5 lives: the training episodes end at every lost life
        assert counts["terminal"] >= 4 * counts["game_over"]


def test_stacks_start_zero_padded_on_both_paths() -> None:
    ale, gym = _both("ALE/Pong-v5", 2, training=False, noop_max=30)
    try:
        for env in (ale, gym):
            obs, _ = env.reset(seed=[1, 2])
            assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
            assert env.single_action_space.n == 6
            # no frame of another episode: only the newest frame is there at a start
            assert obs[:, 3].max() > 0 and not obs[:, :3].any()
    finally:
        ale.close()
        gym.close()


@pytest.mark.parametrize("vector", ["ale", "gymnasium"])
def test_training_clips_rewards_and_reports_the_games_own(vector: str) -> None:
    """Space Invaders pays 5 to 30 a shot: training sees +-1, game_reward the points."""
    env = make_vec_env(EnvConfig(id="ALE/SpaceInvaders-v5", num_envs=2, vector=vector),
                       training=True)
    rng = np.random.default_rng(0)
    try:
        env.reset(seed=[5, 6])
        clipped, points = 0.0, 0.0
        for _ in range(400):
            _, reward_E, _, _, info = env.step(rng.integers(6, size=2))
            assert set(np.unique(reward_E)) <= {0.0, 1.0}
            assert np.array_equal(np.sign(info["game_reward"]), reward_E)
            clipped, points = clipped + reward_E.sum(), points + info["game_reward"].sum()
    finally:
        env.close()
    assert clipped > 0 and points >= 5 * clipped


def test_clip_reward_false_trains_on_the_score() -> None:
    env = make_vec_env(EnvConfig(id="ALE/SpaceInvaders-v5", num_envs=2, clip_reward=False),
                       training=True)
    rng = np.random.default_rng(0)
    try:
        env.reset(seed=[5, 6])
        rewards = [env.step(rng.integers(6, size=2))[1] for _ in range(400)]
    finally:
        env.close()
    assert np.max(rewards) >= 5


@pytest.mark.parametrize("overrides, expected", [
    ([], "env.vector = 'ale': env.id = 'CartPole-v1' is not an ALE id"),
    (["env.id='ALE/Pong-v5'", "env.kwargs={mode=1}"], "env.kwargs ['mode'] are not"),
    (["env.id='ALE/Pong-v5'", "env.frame_stack=2"], "env.frame_stack = 2"),
    (["env.id='ALE/Pong-v5'", "env.wrappers=['custom_envs:mark_first']"], "env.wrappers"),
])
def test_ale_vector_refusals_name_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config("cartpole-dqn", ["env.vector='ale'", *overrides])


@pytest.mark.parametrize("override", ["env.clip_reward=true", "env.terminal_on_life_loss=false"])
def test_atari_training_settings_on_another_env_exit_2_naming_the_field(
        override: str, run_cli: Callable[..., Any]) -> None:
    proc = run_cli("train", "cartpole-dqn", "--set", override)
    assert proc.returncode == 2
    name, _, value = override.partition("=")
    assert f"{name} = {value}: only ALE ids" in proc.stderr and "CartPole-v1" in proc.stderr


def test_auto_falls_back_to_gymnasium_where_ale_cannot() -> None:
    env = make_vec_env(EnvConfig(id="ALE/Pong-v5", num_envs=1, frame_stack=2))
    try:
        assert env.reset(seed=[0])[0].shape == (1, 2, 84, 84)
    finally:
        env.close()


def test_evaluation_plays_whole_games_with_the_games_score() -> None:
    import torch

    class AlwaysFire(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0, 0.0, 0.0]))

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(obs), 4)

    # Breakout with FIRE only: the ball launches, the paddle never moves, 5 lives are lost.
    cfg = EnvConfig(id="ALE/Breakout-v5", num_envs=1)
    result = evaluate(AlwaysFire(), cfg, episodes=2, seed=0)
    assert len(result.returns) == 2
    assert all(length > 5 * 20 for length in result.lengths)  # whole games, not one life


def _random_actor(game: str) -> Any:
    import torch

    from qfleet.roles.actor import Actor

    # epsilon 1: every action is random, so the net is never asked
    return Actor(EnvConfig(id=game, num_envs=2), torch.nn.Identity(), n_step=1, gamma=0.99,
                 epsilon=lambda _: 1.0, seed=0, index=0)


def _random_chunks(game: str, steps: int) -> list[Any]:
    actor = _random_actor(game)
    try:
        return [actor.collect(steps) for _ in range(8)]
    finally:
        actor.close()


def test_actor_metrics_count_whole_games_while_lives_end_training_episodes() -> None:
    chunks = _random_chunks("ALE/Breakout-v5", 100)
    games = [n for c in chunks for n in c.episode_lengths]
    terminals = sum(int((c.transitions.discount_N == 0).sum()) for c in chunks)
    assert len(games) >= 4 and min(games) > 100  # a random game of 5 lives: ~200 steps
    assert terminals >= 4 * len(games)


def test_actor_metrics_report_the_games_score_not_the_clipped_one() -> None:
    chunks = _random_chunks("ALE/SpaceInvaders-v5", 250)
    scores = [r for c in chunks for r in c.episode_returns]
    clipped = [r for c in chunks for r in c.transitions.reward_N]
    assert set(clipped) <= {0.0, 1.0}
    # Aliens are worth 5 to 30 points: a random game scores ~150, ~20 kills clipped.
    assert len(scores) >= 2 and all(s % 5 == 0 for s in scores) and np.mean(scores) > 60


PRESETS = ["pong-dqn", "pong-apex", "breakout-apex"]
# Each preset as it ships, but a few hundred updates, a replay sized for them, and games cut
# at 1,000 steps (an untrained Breakout agent may never serve).
SHORT = ["learner.learning_starts=4000", "replay.capacity=20000", "env.max_episode_steps=1000"]


@pytest.mark.parametrize("backend", ["inline", "processes", "ray"])
@pytest.mark.parametrize("preset", PRESETS)
def test_atari_presets_train_on_every_backend_and_evaluate(
        preset: str, backend: str, tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    train_briefly_and_evaluate(preset, backend, SHORT, 5000, 1, tmp_path / "run", run_cli)
