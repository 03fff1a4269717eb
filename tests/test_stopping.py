"""How a run stops: Ctrl-C is prompt even mid-evaluation, a second Ctrl-C or one during
start-up leaves nothing broken, SIGTERM to a process group restarts no worker, and a run
whose numbers stop being finite stops with the step, keeping its last finite checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import cli_env

from qfleet import checkpoint
from qfleet.config import Config
from qfleet.experiment import Diverged, train

SLOW = ["env.id=envs_for_tests:SlowEnv", "env.max_episode_steps=400", "log.every=128",
        "learner.learning_starts=64", "train.eval_every=256", "train.eval_episodes=20",
        "train.total_env_steps=100000000", "log.tensorboard=false", "log.progress=false",
        "checkpoint.every=0"]


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _wait_for(proc: subprocess.Popen[str], run_dir: Path,
              done: Callable[[list[dict[str, Any]]], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done(_records(run_dir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)


def _start(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qfleet", *args], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_ctrl_c_during_a_long_eval_exits_within_5_s(tmp_path: Path) -> None:
    """20 evaluation episodes of 400 slow steps take about 30 s; Ctrl-C abandons them."""
    run_dir = tmp_path / "run"
    proc = _start(["train", "--run-dir", str(run_dir), *_sets(SLOW)])
    try:
        _wait_for(proc, run_dir, lambda rs: any(r["env_steps"] >= 256 for r in rs))
        time.sleep(1.0)  # the eval at 256 steps is under way (it logs nothing until done)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        _stop(proc)
    assert proc.returncode == 130, err
    assert elapsed < 5.0, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in err and f"qfleet resume {run_dir}" in err
    assert not any(r["event"] == "eval" for r in _records(run_dir))  # it was abandoned
    tensors, meta, _ = checkpoint.load(checkpoint.find(run_dir))
    assert meta["env_steps"] >= 256 and any(k.startswith("online.") for k in tensors)


def test_a_second_ctrl_c_leaves_a_resumable_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(["train", "--run-dir", str(run_dir), *_sets(SLOW)])
    try:
        _wait_for(proc, run_dir, lambda rs: any(r["env_steps"] >= 256 for r in rs))
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 130 and "Traceback" not in err, err
    ckpts = checkpoint.candidates(run_dir)  # a checkpoint, or none: either way resumable
    follow = subprocess.run([sys.executable, "-m", "qfleet", "resume", str(run_dir),
                             *_sets(["train.total_env_steps=300", "train.eval_episodes=1",
                                     "env.max_episode_steps=20"])],
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert follow.returncode == 0, follow.stderr
    if not ckpts:
        assert "starting it again from step 0" in follow.stderr


def _default_sigint() -> None:
    """A child started from a background job inherits an ignored SIGINT, and Python then
    installs no KeyboardInterrupt handler: give the child a terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_start_up_is_quiet() -> None:
    proc = _start(["presets"], preexec_fn=_default_sigint)
    time.sleep(0.4)  # qfleet is still importing torch, gymnasium, ...
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_sigterm_to_the_process_group_restarts_no_worker(tmp_path: Path,
                                                         fast_sets: list[str]) -> None:
    """`timeout`, a batch scheduler or `kill -TERM -PGID` signal every process of the
    group: the workers leave the shutdown to the main process."""
    run_dir = tmp_path / "run"
    proc = _start(["train", "cartpole-gorila-sync", "--run-dir", str(run_dir),
                   *_sets([*fast_sets, "train.total_env_steps=100000000", "log.every=200"])],
                  start_new_session=True)
    try:
        _wait_for(proc, run_dir, lambda rs: len(rs) >= 2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 143, err
    assert "restarting it with fresh seeds" not in err and "Traceback" not in err
    assert checkpoint.load_meta(checkpoint.find(run_dir))["env_steps"] > 0


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(
        make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("learner.lr=1e30", "learner.max_grad_norm=0", "checkpoint.every=256",
                   "train.total_env_steps=5000", "train.eval_every=0")
    with pytest.raises(Diverged, match=r"diverged at env step [\d,]+ \(update \d+\)") as err:
        train(cfg, tmp_path / "run")
    assert "last checkpoint" in str(err.value) and "learner.lr" in str(err.value)
    for ckpt in checkpoint.steps(tmp_path / "run" / "checkpoints"):
        tensors = checkpoint.load(ckpt)[0]
        assert all(bool(torch.isfinite(t).all()) for k, t in tensors.items()
                   if k.startswith(("online.", "target.", "opt.")))
    assert not (tmp_path / "run" / "result.json").exists()


def test_train_max_wall_s_ends_the_run_like_its_step_budget(
        make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("train.max_wall_s=3", "train.total_env_steps=100000000",
                   "train.eval_every=0", "train.eval_episodes=2", "checkpoint.every=0")
    result = train(cfg, tmp_path / "run")
    assert result.stopped == "wall time"
    assert 0 < result.env_steps < 100_000_000
    assert 3.0 <= result.wall_s < 3.0 + 30  # one round, the last eval and the checkpoint
    assert json.loads((tmp_path / "run" / "result.json").read_text())["stopped"] == "wall time"
    ckpt = checkpoint.find(tmp_path / "run")
    assert checkpoint.load(ckpt)[1]["env_steps"] == result.env_steps


def test_a_run_that_spends_its_steps_says_so(make_cfg: Callable[..., Config],
                                             tmp_path: Path) -> None:
    result = train(make_cfg("train.total_env_steps=300", "train.eval_every=0",
                            "train.eval_episodes=1", "train.max_wall_s=600"), tmp_path / "r")
    assert result.stopped == "env steps" and result.env_steps >= 300
