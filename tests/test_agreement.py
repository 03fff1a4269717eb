"""Every transport agrees with inline, the reference: one test per property, parametrized over
the backends that move data between processes (processes with forked workers, processes with
spawned ones, and Ray on a real local cluster).

What must agree is what timing cannot change: the rows and initial priorities an actor writes
while the parameters stay put, the versions actors train on (trailing the learner), and the
global model of the synchronous gradient schemes after the same number of steps.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from _runners import (
    APEX_NO_LEARNING,
    assert_apex_replay,
    assert_same_apex_rows,
    closing,
    gradient_program,
    inline_apex_shards,
    run_until,
    workers_gone,
)

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.runtime import InlineGradientRunner, InlineRunner, make_runner, ray_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as workers compute; so does inline

APEX = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=8", "learner.learning_starts=64",
        "learner.train_every=32", "learner.updates_per_round=4", "learner.batch_size=16",
        "replay.capacity=2000", "net.hidden=[32]", "actors.sync_every=16"]
GORILA = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
          "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=5000",
          "learner.target_update_every=8"]
A2C = ["env.num_envs=2", "net.hidden=[32]"]
QUIET = ["log.progress=false", "log.tensorboard=false"]
DEADLINE_S = 60.0


def _cfg(preset: str, sets: list[str], backend: str, *extra: str) -> qfleet.Config:
    """``backend``: inline, processes (forked workers), spawn (processes, spawned) or ray."""
    where = ["runtime.backend=processes", "runtime.start_method=spawn"] \
        if backend == "spawn" else [f"runtime.backend={backend}"]
    return qfleet.load_config(preset, [*sets, *QUIET, *where, *extra])


@pytest.fixture(params=["processes", "spawn", "ray"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The transport under test; Ray runs on the module's local cluster (conftest)."""
    if request.param == "ray":
        if importlib.util.find_spec("ray") is None:
            pytest.skip("ray is not installed")
        request.getfixturevalue("cluster")
    yield request.param


def _gone(backend: str) -> Callable[[Any], Callable[[], None]]:
    """For ``closing``: what a closed runner of ``backend`` leaves behind must be gone."""
    if backend != "ray":
        return workers_gone
    from test_ray import actors_die  # imports ray: only for the ray parameter

    return lambda runner: actors_die("info" if hasattr(runner, "aggregator")
                                     else "node_id")(runner)


def _runner(backend: str, cfg: qfleet.Config) -> AbstractContextManager[Any]:
    runner = make_runner(cfg.runtime.backend, build_program(cfg), ray_options(cfg),
                         cfg.runtime.start_method)
    return closing(runner, _gone(backend))


def _published_version(runner: Any) -> int:
    """The parameter version the runner last handed to its actors."""
    params = getattr(runner, "params", None)
    return int(params.version.value) if params is not None else int(runner.params_version)


def _model(runner: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in runner.aggregator.model.state_dict().items()}


def _returns(reports: list[Any], workers: int) -> dict[int, list[float]]:
    return {w: [x for r in reports for x in r.returns_by_actor.get(w, [])]
            for w in range(workers)}


# ---------------------------------------------------------------- actor-learner (Ape-X)

def test_actors_write_the_same_rows_and_initial_priorities_as_inline(backend: str) -> None:
    """Learning off, so each actor acts with the initial parameters: actor i writes exactly
    the rows, in the same order and with the same initial priorities (its |n-step TD| with
    its own network), as actor i of the inline run."""
    reference = inline_apex_shards(_cfg("cartpole-apex", APEX, "inline", *APEX_NO_LEARNING), 6)
    with _runner(backend, _cfg("cartpole-apex", APEX, backend, *APEX_NO_LEARNING)) as runner:
        shards = runner.replay.shards
        run_until(runner, lambda *_: all(len(shards[k]) >= len(s)
                                         for k, s in reference.items()), DEADLINE_S)
        assert runner.learner.version == 0
        assert_same_apex_rows(reference, shards)


def test_actors_train_on_versions_that_trail_the_learner(backend: str) -> None:
    program = build_program(_cfg("cartpole-apex", APEX, "inline"))
    assert isinstance(program, ActorLearnerProgram)
    with closing(InlineRunner(program)) as inline:
        for _ in range(12):
            inline.step()
    with _runner(backend, _cfg("cartpole-apex", APEX, backend)) as runner:
        # Until every shard holds data too: Ray starts actor processes one after the other.
        reports = run_until(runner, lambda r, _: r.learner.version >= 40 and len(r.replay) > 300
                            and all(len(s) for s in r.replay.shards.values()), DEADLINE_S)
    for done in (inline, runner):
        assert_apex_replay(done)
    # Parameters flow: chunks come from versions that trail the learner, never lead it, and
    # actors do pick up new versions (a lag that only grew would mean they never loaded).
    lags = [r.param_lag_sum / r.chunks for r in reports if r.chunks]
    assert lags and min(lags) >= 0 and max(lags) < runner.learner.version
    assert _published_version(runner) == runner.learner.version
    assert {a for r in reports for a in r.steps_by_actor} == {0, 1}


# ---------------------------------------------------------------- synchronous gradients

def _inline_to(preset: str, sets: list[str], version: int) -> tuple[Any, dict[int, list[float]]]:
    """The inline run stepped to ``version`` global updates (one per round at most: the
    other backends may take several per step()), and each worker's episode returns."""
    program = gradient_program(_cfg(preset, sets, "inline"))
    with closing(InlineGradientRunner(program)) as inline:
        reports = []
        while inline.updates < version:
            reports.append(inline.step())
            assert reports[-1].updates <= 1
    return inline, _returns(reports, program.num_workers)


def _assert_same_model(ours: dict[str, torch.Tensor],
                       reference: dict[str, torch.Tensor]) -> None:
    """Bit for bit on every backend: each sync member steps its replica on the same
    gradients, in worker order, with the inline aggregator's arithmetic."""
    assert ours.keys() == reference.keys()
    for key, value in ours.items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("sync_every", [1, 3])
def test_sync_gorila_agrees_with_inline(backend: str, sync_every: int) -> None:
    """Sync workers' data does not depend on timing (each waits for the step that used its
    gradient, then pulls it when due), so after the same number of global updates both runs
    hold the same global model and every worker has seen the same episodes. Pulling every
    3 gradients, workers compute on older parameters: the staleness is reported."""
    sets = [*GORILA, f"algo.sync_every={sync_every}"]
    with _runner(backend, _cfg("cartpole-gorila-sync", sets, backend)) as runner:
        reports = run_until(runner, lambda r, _: r.updates >= 40, DEADLINE_S)
        runner.freeze()  # the workers' replicas step on their own until then
        version, model = runner.updates, _model(runner)
    counted = sum(r.updates for r in reports)
    assert 40 <= counted <= version  # the last steps' reports may come after the freeze
    assert sum(r.grads_applied for r in reports) == 2 * counted  # two per sync step
    stale = sum(r.staleness_sum for r in reports)
    assert stale == 0 if sync_every == 1 else stale >= counted  # 0, 1, 2 updates old
    assert sum(r.grads_dropped for r in reports) == 0
    inline, inline_returns = _inline_to("cartpole-gorila-sync", sets, version)
    _assert_same_model(model, inline.aggregator.model.state_dict())
    for w, returns in _returns(reports, 2).items():  # the same episodes, in the same order
        n = min(len(returns), len(inline_returns[w]))
        assert n > 0 and returns[:n] == inline_returns[w][:n]


def test_one_batch_synchronous_group_agrees_with_inline(backend: str) -> None:
    """Grouped with one group of both workers: on processes the members reduce among
    themselves and one of them steps the shared global model (group_reduce). Each member
    copies the model after its group's step, so its data does not depend on timing: the
    same model as inline's gate makes, bit for bit."""
    sets = [*GORILA, "algo.group_size=2"]
    with _runner(backend, _cfg("cartpole-batchsync", sets, backend)) as runner:
        # the shared version may run ahead of the members' merged reports
        reports = run_until(runner, lambda _, reps: sum(x.updates for x in reps) >= 40,
                            DEADLINE_S)
        runner.freeze()
        version, model = runner.updates, _model(runner)
    counted = sum(r.updates for r in reports)
    assert 40 <= counted <= version
    assert sum(r.grads_applied for r in reports) == 2 * counted
    assert sum(r.staleness_sum for r in reports) == 0
    inline, _ = _inline_to("cartpole-batchsync", sets, version)
    _assert_same_model(model, inline.aggregator.model.state_dict())


def test_a2c_agrees_with_inline(backend: str) -> None:
    """A2C is sync and on-policy: each worker's rollout depends on its seeds and the global
    model it pulled after the previous step, never on timing, so after the same number of
    global steps both runs hold the same model and optimizer state (rollouts of different
    lengths weighted by their rows on every backend)."""
    with _runner(backend, _cfg("cartpole-a2c", A2C, backend)) as runner:
        reports = run_until(runner, lambda r, _: r.updates >= 25, DEADLINE_S)
        runner.freeze()
        version, model = runner.updates, _model(runner)
        opt = copy.deepcopy(runner.aggregator.opt.state_dict()["state"])
    assert sum(r.grads_applied for r in reports) == 2 * sum(r.updates for r in reports)
    inline, _ = _inline_to("cartpole-a2c", A2C, version)
    _assert_same_model(model, inline.aggregator.model.state_dict())
    inline_opt = inline.aggregator.opt.state_dict()["state"]
    assert opt.keys() == inline_opt.keys()
    for pid, values in opt.items():
        _assert_same_model({k: torch.as_tensor(v) for k, v in values.items()},
                           {k: torch.as_tensor(v) for k, v in inline_opt[pid].items()})
