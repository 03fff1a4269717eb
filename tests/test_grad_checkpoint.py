"""Checkpoints of gradient schemes: Hogwild's shared model is copied whole (never torn
across a worker's step), and workers' own replays are saved and come back on resume."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _runners import closing, gradient_program, run_until, workers_gone

from qfleet import checkpoint
from qfleet.config import Config
from qfleet.experiment import Experiment, train
from qfleet.runtime import InlineGradientRunner, ProcessesGradientRunner, make_runner
from qfleet.runtime.shm import PauseGate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF = 50_000


def _writer(gate: PauseGate, shared_N: torch.Tensor, stop: mp.synchronize.Event) -> None:
    """A Hogwild-like step that takes time: the first half, a pause, the second half."""
    k = 0
    while not stop.is_set():
        k += 1
        with gate.step(0):
            shared_N[:HALF] = k
            time.sleep(0.0005)
            shared_N[HALF:] = k


def _torn(copy_N: torch.Tensor) -> bool:
    return bool((copy_N != copy_N[0]).any())


def test_a_paused_copy_is_never_torn_and_an_unpaused_one_is() -> None:
    ctx = mp.get_context("fork")
    gate = PauseGate(1, ctx)
    shared_N = torch.zeros(2 * HALF).share_memory_()
    stop = ctx.Event()
    proc = ctx.Process(target=_writer, args=(gate, shared_N, stop), daemon=True)
    proc.start()
    try:
        while shared_N[0] == 0:
            time.sleep(0.001)
        unguarded = sum(_torn(shared_N.clone()) for _ in range(300))
        guarded = 0
        for _ in range(100):
            with gate.paused(lambda i: proc.is_alive()):
                guarded += _torn(shared_N.clone())
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    assert unguarded > 0, "the writer never tore a copy: this test would prove nothing"
    assert guarded == 0


def test_a_dead_worker_does_not_hold_the_pause(tmp_path: Path) -> None:
    gate = PauseGate(2, mp.get_context("fork"))
    gate.busy_W[1] = 1  # killed in the middle of its step
    t0 = time.monotonic()
    with gate.paused(lambda i: i != 1):
        pass
    assert time.monotonic() - t0 < 1.0


def test_hogwild_state_is_a_copy(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("runtime.backend='processes'", "actors.count=2", "env.num_envs=2",
                   "net.hidden=[32]", preset="cartpole-a3c")
    runner = ProcessesGradientRunner(gradient_program(cfg))
    with closing(runner, workers_gone):
        run_until(runner, lambda r, _: r.updates >= 20, 60.0)
        tensors, _, _ = runner.state(with_replay=False)
        live = dict(runner.aggregator.model.state_dict())
        shared = [k for k in tensors if k in live]
        assert shared and all(tensors[k].data_ptr() != live[k].data_ptr() for k in shared)


# ---------------------------------------------------------------- workers' own replays

LOCAL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
         "learner.batch_size=16", "learner.learning_starts=600", "replay.capacity=5000",
         "checkpoint.replay=true", "checkpoint.every=0", "train.eval_every=0",
         "train.total_env_steps=1400"]


def _steps_to_first_gradient(runner: InlineGradientRunner | ProcessesGradientRunner) -> int:
    start = runner.env_steps
    run_until(runner, lambda r, reps: any(x.loss_count for x in reps), 60.0)
    return runner.env_steps - start


@pytest.mark.parametrize("backend, preset", [("inline", "cartpole-gorila-sync"),
                                             ("processes", "cartpole-gorila-sync"),
                                             ("processes", "cartpole-batchsync")])
def test_workers_own_replays_are_saved_and_restored(backend: str, preset: str, tmp_path: Path,
                                                    make_cfg: Callable[..., Config]) -> None:
    """Sync replicas and a grouped group's members (a group of both workers) each own their
    replay: the final checkpoint has it, a resumed worker starts from it (n-step 1: each
    env step one row)."""
    cfg = make_cfg(*LOCAL, f"runtime.backend='{backend}'", "algo.n_step=1", preset=preset)
    train(cfg, tmp_path / "run")
    _, meta, replay = checkpoint.load(checkpoint.find(tmp_path / "run"))
    sizes = []
    for i in range(2):
        part = checkpoint.with_prefix(replay, f"worker{i}.")
        assert part, f"worker {i}'s replay is not in the checkpoint"
        sizes.append(int(part["meta"][1]))  # RingStorage: [cursor, size]
        assert sizes[-1] == int(part["worker.collected"][0]) >= 600
    if backend == "inline":
        assert sum(sizes) == meta["env_steps"]
    else:  # a worker may have collected one or two chunks the main process had not counted
        assert meta["env_steps"] <= sum(sizes) <= meta["env_steps"] + 2 * 2 * 4

    cfg.train.total_env_steps *= 2  # continued with a budget left: a sync group on
    exp = Experiment(cfg, tmp_path / "run")  # processes steps only until its budget
    try:
        exp.restore_latest()
        runner = exp.runner
        assert isinstance(runner, (InlineGradientRunner, ProcessesGradientRunner))
        if isinstance(runner, InlineGradientRunner):
            assert [len(w.replay) for w in runner.workers if w.replay is not None] == sizes
        # Refilling would take 600 env steps per worker before any gradient; restored
        # replays give one at the first chunk each worker collects.
        assert _steps_to_first_gradient(runner) <= 2 * 4 * 2
    finally:
        exp.close()


def test_without_the_replay_setting_workers_refill(tmp_path: Path,
                                                   make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(*LOCAL, "checkpoint.replay=false", preset="cartpole-gorila-sync")
    cfg.runtime.backend = "inline"
    train(cfg, tmp_path / "run")
    replay = checkpoint.load(checkpoint.find(tmp_path / "run"))[2]
    assert not replay
    exp = Experiment(cfg, tmp_path / "run")
    try:
        exp.restore_latest()
        assert isinstance(exp.runner, InlineGradientRunner)
        assert _steps_to_first_gradient(exp.runner) >= 600
    finally:
        exp.close()


@pytest.mark.parametrize("backend", ["inline", "processes"])
def test_restored_workers_continue_their_epsilon_schedules(
        backend: str, make_cfg: Callable[..., Config]) -> None:
    """A checkpoint keeps each worker's env steps and a resumed worker's actor starts from
    them: it explores as much as it did, not as a fresh worker (epsilon 1)."""
    cfg = make_cfg("actors.count=2", "env.num_envs=1", "actors.chunk_size=4",
                   "net.hidden=[32]", "learner.batch_size=16", "learner.learning_starts=32",
                   "train.total_env_steps=4000", f"runtime.backend='{backend}'",
                   preset="cartpole-gorila-async")
    runner = make_runner(backend, gradient_program(cfg))
    with closing(runner, workers_gone if backend == "processes" else None):
        reports = run_until(runner, lambda r, _: r.env_steps >= 400, 60.0)
        before = [r.epsilon for r in reports if r.epsilon is not None][-1]
        tensors, meta, replay = runner.state(with_replay=False)
        runner.restore(tensors, meta, replay)
        after = run_until(runner, lambda r, reps: any(x.epsilon is not None for x in reps),
                          60.0)
    epsilon = next(r.epsilon for r in after if r.epsilon is not None)
    assert sum(w["env_steps"] for w in meta["workers"]) == meta["env_steps"] >= 400
    assert epsilon <= before < 0.85, (before, epsilon)
