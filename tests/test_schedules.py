"""The learning-rate schedule: its values by hand, and every place that steps an optimizer
(the DQN and actor-critic learners, the gradient aggregator, a Hogwild worker) setting the
rate for the env steps the run has reached."""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qfleet
from qfleet import checkpoint
from qfleet.algos import build_program
from qfleet.schedules import LrSchedule

TOTAL = 2000


def test_rates_by_hand() -> None:
    line = LrSchedule("linear", 1e-3, 1e-4, 1000)
    assert [line.at(s) for s in (0, 250, 1000, 5000)] == pytest.approx(
        [1e-3, 1e-3 - 0.25 * 9e-4, 1e-4, 1e-4])  # past the horizon: the final rate
    cos = LrSchedule("cosine", 1e-3, 0.0, 1000)
    assert [cos.at(s) for s in (0, 500, 1000)] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-12)
    assert cos.at(250) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert LrSchedule("constant", 1e-3, 0.0, 1000).at(900) == 1e-3
    up = LrSchedule("linear", 1e-4, 1e-3, 1000)  # a warm-up is a schedule too
    assert up.at(500) == pytest.approx(5.5e-4)


@pytest.mark.parametrize(("preset", "backend"), [
    ("cartpole-dqn", "inline"),  # the DQN learner
    ("cartpole-a3c", "inline"),  # the actor-critic learner
    ("cartpole-a2c", "processes"),  # the aggregator, in the main process
    ("cartpole-gorila-sync", "inline"),  # the aggregator, inline
])
def test_the_last_update_used_the_rate_of_its_env_steps(tmp_path: Path, preset: str,
                                                        backend: str) -> None:
    cfg = qfleet.load_config(preset, [
        f"train.total_env_steps={TOTAL}", "learner.lr=0.001", "learner.lr_schedule='linear'",
        "learner.lr_final=0.0", "train.eval_episodes=1", "train.eval_every=0",
        "log.tensorboard=false", "log.progress=false", f"runtime.backend='{backend}'",
        "net.hidden=[32]"])
    result = qfleet.train(cfg, tmp_path / "run")
    meta = checkpoint.load(checkpoint.find(tmp_path / "run"))[1]
    lr = meta["optimizer"]["param_groups"][0]["lr"]
    steps = TOTAL * (1 - lr / 1e-3)  # the env steps whose rate this is, on the line
    assert steps == pytest.approx(round(steps), abs=1e-6), "a rate no env step count gives"
    assert result.env_steps - 1000 < steps <= result.env_steps, (steps, result.env_steps)


def _train_cartpole(run_dir: Path, *overrides: str) -> None:
    """cartpole-dqn for TOTAL env steps at learner.lr = 1e-3, plus ``overrides``."""
    qfleet.train(qfleet.load_config("cartpole-dqn", [
        f"train.total_env_steps={TOTAL}", "learner.lr=0.001", "train.eval_episodes=1",
        "log.tensorboard=false", "log.progress=false", *overrides]), run_dir)


def test_a_constant_rate_stays_the_configured_one(tmp_path: Path) -> None:
    _train_cartpole(tmp_path / "run", "learner.lr_schedule='constant'", "learner.lr_final=0.5")
    meta = checkpoint.load(checkpoint.find(tmp_path / "run"))[1]
    assert meta["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_a_hogwild_worker_steps_at_the_rate_of_the_runs_env_steps() -> None:
    """A Hogwild worker steps the shared model itself, with the env steps the main process
    last counted (its own optimizer copy: checked here on the worker's apply path), and
    counts its env steps in the run's shared counter."""
    from qfleet.roles.gradients import Gradient
    from qfleet.runtime.grad_worker import hogwild_apply
    from qfleet.runtime.shm import PauseGate

    cfg = qfleet.load_config("cartpole-a3c", [
        f"train.total_env_steps={TOTAL}", "learner.lr_schedule='cosine'", "net.hidden=[32]"])
    program = build_program(cfg)
    aggregator = program.make_aggregator()
    ctx = mp.get_context("fork")
    size = sum(p.numel() for p in aggregator.params)
    sh = SimpleNamespace(aggregator=aggregator, pause=PauseGate(1, ctx),
                         env_steps=ctx.RawValue("q", 1500), taken=ctx.RawValue("q", 10))
    grad = Gradient(0, 0, 4, grads_P=torch.ones(size))
    hogwild_apply(sh, 0, grad)  # type: ignore[arg-type]
    assert grad.applied_at == 1 and grad.grads_P is None
    assert aggregator.opt.param_groups[0]["lr"] == LrSchedule.of(cfg).at(1500) < cfg.learner.lr
    assert sh.taken.value == 14


def test_the_metrics_log_the_rate_of_the_schedule(tmp_path: Path) -> None:
    _train_cartpole(tmp_path / "run", "learner.lr_schedule='linear'", "log.every=500")
    lines = [r for r in qfleet.metrics.read_metrics(tmp_path / "run") if r["event"] == "train"]
    assert len(lines) >= 3
    for r in lines:
        assert r["lr"] == pytest.approx(1e-3 * (1 - min(r["env_steps"], TOTAL) / TOTAL))
