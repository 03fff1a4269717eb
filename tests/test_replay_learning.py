"""Slow lane: cartpole-per solves CartPole-v1 in no more env steps than cartpole-dqn.

Both presets share every learning setting except the replay, and inline runs are
deterministic under a seed, so the comparison is seed by seed (about 30 s per run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qfleet.config import load_config
from qfleet.experiment import Result, train

pytestmark = pytest.mark.slow


def solve(preset: str, seed: int, run_dir: Path) -> Result:
    cfg = load_config(preset, [f"seed={seed}", "log.tensorboard=false", "log.progress=false",
                               "checkpoint.every=0"])
    return train(cfg, run_dir)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cartpole_per_solves_no_later_than_dqn(seed: int, tmp_path: Path) -> None:
    per = solve("cartpole-per", seed, tmp_path / "per")
    dqn = solve("cartpole-dqn", seed, tmp_path / "dqn")
    summary = json.dumps({"per": per.solved_at_env_steps, "dqn": dqn.solved_at_env_steps,
                          "per_eval": per.eval_return_mean, "dqn_eval": dqn.eval_return_mean})
    assert per.eval_return_mean >= 475, summary
    assert per.solved_at_env_steps is not None, summary
    assert dqn.solved_at_env_steps is None or per.solved_at_env_steps <= dqn.solved_at_env_steps, \
        summary
