"""Slow lane: Ape-X learns CartPole for real, with actor processes on the processes backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qfleet

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cartpole_apex_solves_on_processes(seed: int, tmp_path: Path) -> None:
    cfg = qfleet.load_config("cartpole-apex", [f"seed={seed}", "log.progress=false",
                                               "log.tensorboard=false"])
    assert cfg.runtime.backend == "processes" and cfg.actors.count == 2
    result = qfleet.train(cfg, tmp_path / "run")
    assert result.eval_return_mean >= 475.0, result
    assert result.env_steps <= cfg.train.total_env_steps
    # Both actors delivered data (each through its own shard).
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    rates = [r["env_steps_per_s_by_actor"] for r in lines if r["event"] == "train"]
    assert rates and all(v > 0 for v in rates[-1])
