"""The Atari path end to end on a real ALE game: preprocessing, Nature-CNN, uint8 replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qfleet
from qfleet.config import EnvConfig
from qfleet.envs import make_vec_env

pytest.importorskip("ale_py", reason="Atari needs the qfleet[atari] extra")


def test_pong_stacks_preprocessed_frames() -> None:
    env = make_vec_env(EnvConfig(id="ALE/Pong-v5", num_envs=2))
    try:
        obs, _ = env.reset(seed=[1, 2])
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        assert env.single_action_space.n == 6  # type: ignore[attr-defined]
        # After a reset the stack repeats the first frame: no frame of another episode.
        assert obs[:, 3].max() > 0
        assert all(np.array_equal(obs[:, k], obs[:, 3]) for k in range(3))
    finally:
        env.close()


def test_pong_trains_a_few_updates(tmp_path) -> None:
    cfg = qfleet.load_config("cartpole-dqn", [
        'env.id="ALE/Pong-v5"', "env.max_episode_steps=200", "net.hidden=[64]",
        "replay.capacity=1000", "train.total_env_steps=640", "learner.learning_starts=256",
        "learner.batch_size=8", "learner.train_every=128", "learner.updates_per_round=4",
        "train.eval_every=0", "train.eval_episodes=1", "log.progress=false", "log.every=128",
        "log.tensorboard=false"])
    result = qfleet.train(cfg, tmp_path / "pong")
    assert result.env_steps == 640
    assert result.updates == 4 * ((640 - 256) // 128 + 1)
    records = [json.loads(line) for line in (tmp_path / "pong" / "metrics.jsonl").open()]
    assert any(r["event"] == "train" and r["loss"] is not None for r in records)
