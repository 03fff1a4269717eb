"""The processes backend with real worker processes: faults, restores, signals, shutdown
(agreement with inline is in test_agreement)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from _cli import running
from _runners import (
    closing,
    run_until,
    workers_gone,
)

import qfleet
from qfleet import checkpoint
from qfleet.algos import build_program
from qfleet.runtime import ProcessesRunner, WorkerError

SMALL = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=8", "learner.learning_starts=64",
         "learner.train_every=32", "learner.updates_per_round=4", "learner.batch_size=16",
         "replay.capacity=2000", "net.hidden=[32]", "actors.sync_every=16",
         "log.progress=false", "log.tensorboard=false"]


def _cfg(*extra: str) -> qfleet.Config:
    return qfleet.load_config("cartpole-apex", [*SMALL, *extra])


def processes_runner(*extra: str) -> AbstractContextManager[ProcessesRunner]:
    return closing(ProcessesRunner(build_program(_cfg(*extra))), workers_gone)


def test_killed_actor_is_restarted_and_delivered_data_stays() -> None:
    with processes_runner() as runner:
        run_until(runner, lambda r, _: len(r.replay) >= 200)
        victim = runner.workers[0].process
        before = len(runner.replay)
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        t0 = time.monotonic()
        reports = run_until(runner, lambda _, reps: any(x.actor_restarts for x in reps), 10.0)
        assert time.monotonic() - t0 < 5.0
        assert runner.workers[0].incarnation == 1 and runner.workers[0].process.is_alive()
        assert any("SIGKILL" in note for r in reports for note in r.notes)
        assert len(runner.replay) >= before
        # The new incarnation delivers again.
        steps = runner.env_steps
        run_until(runner, lambda r, reps: any(x.steps_by_actor.get(0) for x in reps[-5:])
                  and r.env_steps > steps + 100)


def test_restore_restarts_actors_as_new_incarnations_and_voids_their_old_chunks() -> None:
    """A resumed run must not replay the first run's seeds: every actor comes back as the
    next incarnation of the one saved, and chunks of the old ones are never read."""
    with processes_runner() as runner:
        run_until(runner, lambda r, _: len(r.replay) >= 100)
        tensors, meta, replay = runner.state(with_replay=True)
        assert meta["actors"] == [{"incarnation": 0}, {"incarnation": 0}]
        meta["actors"] = [{"incarnation": 3}, {"incarnation": 5}]
        old = [w.process for w in runner.workers]
        runner.restore(tensors, meta, replay)
        assert [w.incarnation for w in runner.workers] == [4, 6]
        assert not any(p.is_alive() for p in old)
        assert set(runner.slots) == {(0, 4), (1, 6)}
        steps = runner.env_steps
        reports = run_until(runner, lambda r, _: r.env_steps > steps + 100)
        assert {a for r in reports for a in r.steps_by_actor} <= {0, 1}


def test_worker_exception_reports_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    with processes_runner("env.id='faulty_envs:ExplodingEnv'") as runner, \
            pytest.raises(WorkerError, match="boom from inside the env"):
        run_until(runner, lambda *_: False, 20.0)


def _both_deliver(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    rates = [json.loads(x).get("env_steps_per_s_by_actor") for x in lines[-1:]]
    return bool(rates and rates[0] and all(r > 0 for r in rates[0]))


def _children(pid: int) -> list[str]:
    """Worker processes of ``pid`` (not spawn's resource tracker, which is no worker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [c for c in out.stdout.split() if "resource_tracker" not in _cmdline(c)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # it ended meanwhile
        return ""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_stops_every_worker(tmp_path: Path, sig: int, code: int) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "qfleet", "train", "cartpole-apex", "--run-dir", str(run_dir),
           *[x for s in SMALL for x in ("--set", s)], "--set", "train.total_env_steps=10000000",
           "--set", "log.every=200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").is_file() or \
                not (run_dir / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == code, err
        ckpt = checkpoint.find(run_dir)
        tensors, meta, _ = checkpoint.load(ckpt)
        assert meta["env_steps"] > 0 and "online.advantage.weight" in tensors
        for pid in workers:  # every actor process is gone
            assert not running(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_learner_exception_stops_workers_and_keeps_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qfleet.roles.learner import DQNLearner

    real_step, calls = DQNLearner._step, {"n": 0}

    def failing_step(self: DQNLearner, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 60:
            raise FloatingPointError("learner exploded on purpose")
        return real_step(self, *args)

    monkeypatch.setattr(DQNLearner, "_step", failing_step)
    # A budget the run must not reach: if the failure never fired, the test fails fast.
    cfg = _cfg("checkpoint.every=100", "train.total_env_steps=20000", "train.eval_every=0")
    with pytest.raises(FloatingPointError, match="on purpose"):
        qfleet.train(cfg, tmp_path / "run")
    assert calls["n"] == 61
    assert not any(running(pid) for pid in _children(os.getpid()))
    _, meta, replay = checkpoint.load(checkpoint.find(tmp_path / "run"))
    assert meta["updates"] > 0 and replay


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_actors_exit_when_the_main_process_is_killed(tmp_path: Path, start_method: str) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "qfleet", "train", "cartpole-apex", "--run-dir", str(run_dir),
           *[x for s in SMALL for x in ("--set", s)], "--set", "train.total_env_steps=10000000",
           "--set", f"runtime.start_method='{start_method}'"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # until both actors deliver (spawned ones import
        while len(workers := _children(proc.pid)) < 2 or not _both_deliver(run_dir):  # first)
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in workers):  # the publisher may have died
            assert time.monotonic() < deadline, "actor outlived its learner"  # mid-write
            time.sleep(0.1)
    finally:
        for pid in _children(proc.pid):
            os.kill(int(pid), signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
