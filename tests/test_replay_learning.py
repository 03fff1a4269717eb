"""Slow lane: cartpole-per solves CartPole-v1 for every seed, in no more env steps in
total than cartpole-dqn over the same three seeds.

Both presets share every learning setting except the replay, and inline runs are
deterministic under a seed on one machine (about 30 s per run). Across machines the float
results of the network differ in their last bits and a seed's trajectory with them, so
which scheme solves one given seed first is not a property of the schemes (seed 0 went
each way on two machines); the total over seeds is compared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from qfleet.config import load_config
from qfleet.experiment import Result, train

pytestmark = pytest.mark.slow


def solve(preset: str, seed: int, run_dir: Path) -> Result:
    cfg = load_config(preset, [f"seed={seed}", "log.tensorboard=false", "log.progress=false",
                               "checkpoint.every=0"])
    return train(cfg, run_dir)


def test_cartpole_per_solves_every_seed_and_no_later_than_dqn_in_total(
        tmp_path: Path, cartpole_dqn_run: Callable[[int], Result]) -> None:
    runs = {seed: (solve("cartpole-per", seed, tmp_path / f"per-{seed}"),
                   cartpole_dqn_run(seed)) for seed in (0, 1, 2)}
    summary = json.dumps({seed: {"per": per.solved_at_env_steps, "dqn": dqn.solved_at_env_steps,
                                 "per_eval": per.eval_return_mean,
                                 "dqn_eval": dqn.eval_return_mean}
                          for seed, (per, dqn) in runs.items()})
    for per, _ in runs.values():
        assert per.eval_return_mean >= 475, summary
        assert per.solved_at_env_steps is not None, summary
    budget = {seed: dqn.solved_at_env_steps or dqn.env_steps for seed, (_, dqn) in runs.items()}
    per_total = sum(per.solved_at_env_steps or 0 for per, _ in runs.values())
    assert per_total <= sum(budget.values()), summary
