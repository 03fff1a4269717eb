"""Slow lane: the cartpole-dqn preset solves CartPole-v1 within its 50k-step budget."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from qfleet.config import load_config
from qfleet.experiment import Result

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cartpole_dqn_preset_solves(seed: int, cartpole_dqn_run: Callable[[int], Result]
                                    ) -> None:
    # Only output switches are changed: the learning settings are the preset's own.
    cfg = load_config("cartpole-dqn")
    assert cfg.train.total_env_steps == 50_000 and cfg.train.target_return == 475.0
    result = cartpole_dqn_run(seed)
    summary = json.dumps({k: v for k, v in vars(result).items() if k != "run_dir"})
    assert result.eval_return_mean >= 475, summary
    # The budget as the loop counts it: whole chunks, stopping at the first that reaches
    # 50,000 steps (50,048 here), then the final eval; on an AMD EPYC runner seed 0 first
    # reaches 475 at that final eval (at 7406bc4 too), earlier runners before it.
    chunk = cfg.actors.chunk_size * cfg.env.num_envs
    assert result.env_steps < cfg.train.total_env_steps + chunk, summary
    assert result.solved_at_env_steps is not None, summary
    assert result.solved_at_env_steps == result.env_steps, summary  # stopped on reaching it
