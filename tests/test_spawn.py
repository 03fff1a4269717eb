"""The processes backend with workers started by ``spawn`` (and ``forkserver``), not fork:
programs pickle, shared memory travels as handles, and the results are the ones fork and
inline give (runtime.start_method; macOS and Python 3.14 default away from fork). Spawned
workers' agreement with inline is in test_agreement."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from _runners import (
    closing,
    gradient_program,
    run_until,
    workers_gone,
)

import qfleet
from qfleet.algos import build_program
from qfleet.replay import ShardedReplay
from qfleet.runtime import (
    ProcessesGradientRunner,
    ProcessesRunner,
    WorkerError,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APEX = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=8", "learner.learning_starts=64",
        "learner.train_every=32", "learner.updates_per_round=4", "learner.batch_size=16",
        "replay.capacity=2000", "net.hidden=[32]", "actors.sync_every=16",
        "log.progress=false", "log.tensorboard=false"]
GRAD = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
        "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=5000",
        "log.progress=false", "log.tensorboard=false"]


def _apex(*extra: str) -> qfleet.Config:
    return qfleet.load_config("cartpole-apex", [*APEX, *extra])


def _grad(preset: str, *extra: str) -> qfleet.Config:
    return qfleet.load_config(preset, [*GRAD, *extra])


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in module.state_dict().values()])


def test_spawned_hogwild_workers_move_the_shared_model() -> None:
    cfg = qfleet.load_config("cartpole-a3c", ["env.num_envs=2", "net.hidden=[32]",
                                              "log.progress=false"])
    with closing(ProcessesGradientRunner(gradient_program(cfg), "spawn"), workers_gone) as r:
        start = _flat(r.aggregator.online)
        run_until(r, lambda runner, _: runner.updates >= 30, 90.0)
        assert not torch.equal(start, _flat(r.aggregator.online))


def test_spawned_workers_share_the_sharded_replay_in_shared_memory() -> None:
    with closing(ProcessesGradientRunner(gradient_program(_grad("cartpole-dper")), "spawn"),
                 workers_gone) as runner:
        run_until(runner, lambda r, _: r.updates >= 20, 90.0)
        replay = runner.shared_replay
        assert isinstance(replay, ShardedReplay)
        prio = np.concatenate([s.tree.priorities_N[: len(s)] for s in replay.shards.values()])
    assert all(len(s) > 0 for s in replay.shards.values())
    assert len(np.unique(prio)) > 10  # priorities came back from the spawned workers


def test_forkserver_workers_run_too() -> None:
    runner = ProcessesGradientRunner(gradient_program(_grad("cartpole-gorila-async")),
                                     "forkserver")
    with closing(runner, workers_gone):
        run_until(runner, lambda r, _: r.updates >= 10, 90.0)


def test_a_killed_spawned_actor_is_restarted() -> None:
    runner = ProcessesRunner(build_program(_apex()), "spawn")  # type: ignore[arg-type]
    with closing(runner, workers_gone):
        run_until(runner, lambda r, _: r.env_steps > 200, 90.0)
        victim = runner.workers[0].process
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        reports = run_until(runner, lambda r, reps: sum(x.actor_restarts for x in reps) > 0
                            and r.workers[0].process.is_alive(), 90.0)
        assert any("SIGKILL" in note for r in reports for note in r.notes)


def test_a_spawned_workers_exception_stops_the_run() -> None:
    cfg = _grad("cartpole-gorila-sync", "env.id='envs_for_tests:ExplodingEnv'")
    runner = ProcessesGradientRunner(gradient_program(cfg), "spawn")
    with closing(runner, workers_gone), pytest.raises(WorkerError, match="exploded on purpose"):
        run_until(runner, lambda *_: False, 90.0)
