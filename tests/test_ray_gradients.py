"""Gradient schemes (Gorila sync/async/grouped, A3C, A2C) on the Ray backend, on a real
multi-node Ray cluster on this machine (the cluster helpers of test_ray.py: a head without
CPUs and two worker nodes of 2 CPUs). Every runner is closed, also on failure; the cluster
is shut down at the end of the module and its processes are checked to be gone."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from _runners import closing, gradient_program, run_until  # noqa: E402
from test_ray import WORKER, RayCluster, actors_die  # noqa: E402

import qfleet  # noqa: E402
from qfleet.algos import build_program  # noqa: E402
from qfleet.config import Config  # noqa: E402
from qfleet.runtime import InlineGradientRunner, RoundReport, WorkerError, make_runner  # noqa: E402
from qfleet.runtime.ray_gradients import HOGWILD_NOTE, RayGradientRunner  # noqa: E402

SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
         "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=5000",
         "log.progress=false", "log.tensorboard=false", "runtime.backend=ray"]
SMALL_AC = ["env.num_envs=2", "net.hidden=[32]", "log.progress=false", "log.tensorboard=false",
            "runtime.backend=ray"]


def _cfg(preset: str, *extra: str) -> Config:
    small = SMALL_AC if preset.startswith("cartpole-a") else SMALL
    return qfleet.load_config(preset, [*small, *extra])


def ray_grad_runner(cfg: Config) -> AbstractContextManager[RayGradientRunner]:
    runner = make_runner("ray", build_program(cfg))
    assert isinstance(runner, RayGradientRunner)
    return closing(runner, actors_die("info"))


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in module.state_dict().values()])


def _total(reports: list[RoundReport], name: str) -> Any:
    return sum(getattr(r, name) for r in reports)


# ------------------------------------------------------------------ sync: the collective

def test_gorila_sync_spreads_workers_and_steps_their_replicas_over_gloo(
        cluster: RayCluster) -> None:
    with ray_grad_runner(_cfg("cartpole-gorila-sync")) as runner:
        assert runner.collective
        reports = run_until(runner, lambda r, _: r.updates >= 300, 50.0)
        info = runner.worker_info()
    nodes = [i["node_id"] for i in info]
    assert len(set(nodes)) == 2 and set(nodes) <= {n.node_id for n in cluster.workers}, info
    assert all(i["dist"] and i["backend"] == "gloo" and i["world_size"] == 2 for i in info)
    assert sorted(i["rank"] for i in info) == [0, 1]
    assert _total(reports, "updates") == runner.updates
    assert _total(reports, "grads_applied") == 2 * runner.updates  # both in every step
    assert _total(reports, "staleness_sum") == 0 and _total(reports, "grads_dropped") == 0
    assert {w for r in reports for w in r.steps_by_actor} == {0, 1}
    assert not _total(reports, "actor_restarts")


def test_sync_worker_exception_stops_the_run_with_its_traceback(cluster: RayCluster) -> None:
    """The failing worker still takes part in the round's all_reduce before it raises, so
    its peer is not left waiting for the collective's timeout."""
    cfg = _cfg("cartpole-gorila-sync", "env.id='ray_envs:ExplodingInRayActor'")
    t0 = time.monotonic()
    with ray_grad_runner(cfg) as runner, pytest.raises(WorkerError) as err:
        run_until(runner, lambda *_: False, 30.0)
    assert time.monotonic() - t0 < 25.0
    assert "boom from inside the env" in str(err.value) and "ray_envs.py" in str(err.value)
    assert "worker " in str(err.value)


def test_lost_node_in_sync_rebuilds_the_group_and_training_goes_on(
        cluster: RayCluster) -> None:
    try:
        with ray_grad_runner(_cfg("cartpole-gorila-sync")) as runner:
            run_until(runner, lambda r, _: r.updates >= 30, 45.0)
            nodes = [i["node_id"] for i in runner.worker_info()]
            victim = next(n for n in cluster.workers if n.node_id == nodes[0])
            updates = runner.updates
            cluster.cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
            cluster.workers.remove(victim)

            def recovered(r: RayGradientRunner, reps: list[RoundReport]) -> bool:
                # ... and the replacement contributes again, once its fresh local replay
                # refilled (until then the survivor steps alone).
                return any(x.actor_restarts for x in reps) and r.updates >= updates + 60 \
                    and r.group == [0, 1] and 0 < reps[-1].updates * 2 == reps[-1].grads_applied

            reports = run_until(runner, recovered, 60.0)
            info = runner.worker_info()
            incarnation = runner.slots[0].incarnation
            target = runner.updates + 20
            more = run_until(runner, lambda r, _: r.updates >= target, 30.0)
        assert _total(reports, "actor_restarts") >= 1
        assert any("lost" in n or "died" in n for r in reports for n in r.notes)
        assert victim.node_id not in [i["node_id"] for i in info]
        assert all(i["world_size"] == 2 for i in info), info  # the replacement rejoined
        assert incarnation >= 1
        assert _total(more, "grads_applied") == 2 * _total(more, "updates")
    finally:  # give the cluster its second worker back for the tests after this one
        while len(cluster.workers) < 2:
            cluster.workers.append(cluster.cluster.add_node(**WORKER))
        cluster.cluster.wait_for_nodes()


def test_sync_worker_killed_for_good_is_replaced_and_wait_mode_never_steps_alone(
        cluster: RayCluster) -> None:
    """ray.kill(no_restart=True): Ray will not bring the worker back, so the runner makes a
    new actor; with on_worker_loss = "wait" no step is taken by the survivor alone."""
    cfg = _cfg("cartpole-gorila-sync", "algo.on_worker_loss='wait'")
    with ray_grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.updates >= 20, 45.0)
        old, updates = runner.slots[1].handle, runner.updates
        ray.kill(old, no_restart=True)
        seen: list[tuple[bool, int]] = []  # (worker 1 recovering, global version)

        def done(r: RayGradientRunner, reps: list[RoundReport]) -> bool:
            seen.append((r.slots[1].recovering, r.updates))
            return any(x.actor_restarts for x in reps) and r.group == [0, 1] and \
                r.updates >= updates + 30

        reports = run_until(runner, done, 50.0)
        assert runner.slots[1].handle != old and runner.slots[1].incarnation == 1
        assert [i["world_size"] for i in runner.worker_info()] == [2, 2]
    assert any("ActorDiedError" in n for r in reports for n in r.notes)
    assert _total(reports, "actor_restarts") == 1
    assert any(recovering for recovering, _ in seen)  # the driver saw the replacement come
    # No step without both workers' gradients: not while the replacement was not up, nor
    # while it refilled its replay. (The version may still move while it is recovering:
    # the survivor's call reports the rounds both took before the kill.)
    assert _total(reports, "grads_applied") == 2 * _total(reports, "updates")


# ------------------------------------------------------------------ async, grouped, A3C, A2C

@pytest.mark.parametrize("preset, extra", [
    ("cartpole-gorila-async", ["algo.max_staleness=100"]),
    ("cartpole-batchsync", ["actors.count=4", "algo.group_size=2", "algo.max_staleness=100"]),
    ("cartpole-a3c", []),
    ("cartpole-a2c", [])])
def test_async_grouped_a3c_and_a2c_run_and_update(cluster: RayCluster, preset: str,
                                                  extra: list[str]) -> None:
    cfg = _cfg(preset, *extra)
    with ray_grad_runner(cfg) as runner:
        start = _flat(runner.aggregator.online)
        count = runner.program.num_workers

        def done(r: RayGradientRunner, reps: list[RoundReport]) -> bool:
            # async workers do not wait for each other, and an actor on a node that was
            # just added may start seconds after the others: wait until every one sent
            return r.updates >= 60 and {w for x in reps for w in x.steps_by_actor} == \
                set(range(count))

        reports = run_until(runner, done, 50.0)
        moved = _flat(runner.aggregator.online)
        group = runner.program.group_size
    assert not torch.equal(start, moved)
    assert _total(reports, "updates") == runner.updates
    notes = [n for r in reports for n in r.notes]
    assert (HOGWILD_NOTE in notes) == (preset == "cartpole-a3c")
    assert notes.count(HOGWILD_NOTE) <= 1
    applied = _total(reports, "grads_applied")
    if preset == "cartpole-a3c":  # Hogwild mapped to async: one gradient per step
        assert not runner.collective and applied == runner.updates
    elif preset == "cartpole-a2c":  # sync: the collective, every worker in every step
        assert runner.collective and applied == count * runner.updates
    else:
        assert not runner.collective and applied == group * runner.updates


def test_sharded_replay_lives_in_a_ray_actor_that_fills_and_gets_priorities(
        cluster: RayCluster) -> None:
    cfg = _cfg("cartpole-dper")
    with ray_grad_runner(cfg) as runner:
        assert runner.replay_host is not None and "Ray actor" in runner.describe()
        run_until(runner, lambda r, _: r.updates >= 30, 45.0)
        size, steps = runner.replay_size, runner.env_steps
        _, arrays = ray.get(runner.replay_host.state.remote(True))
    assert steps > 0 and steps - 2 * 2 * cfg.actors.chunk_size <= size <= steps
    for shard in (0, 1):
        prio = arrays[f"shard{shard}.prio.priority_N"]
        prio = prio[prio > 0]
        assert len(prio) > 0 and np.all(np.isfinite(prio)), shard
        assert len(np.unique(prio)) > 10, f"shard {shard}: priorities never written back"


def test_checkpoint_state_round_trips_through_the_replay_actor(cluster: RayCluster) -> None:
    cfg = _cfg("cartpole-gorila-sync", "replay.scope='shared'")
    with ray_grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.updates >= 10, 45.0)
        tensors, meta, replay = runner.state(with_replay=True)
        size = runner.replay_size
        assert replay and meta["replay_rng"] and meta["updates"] == runner.updates
        incarnations = [s.incarnation for s in runner.slots]
        runner.restore(tensors, meta, replay)
        assert [s.incarnation for s in runner.slots] == [i + 1 for i in incarnations]
        assert runner.replay_size >= size
        version = runner.updates
        run_until(runner, lambda r, _: r.updates >= version + 10, 45.0)


def test_sync_checkpoint_holds_the_groups_replica_and_resumes_as_inline_does(
        cluster: RayCluster) -> None:
    """The checkpoint's model and optimizer are the members' replica (the driver steps
    nothing); restored from it, Ray continues exactly as an inline run restored from the
    same checkpoint (fresh incarnations, same seeds), bit for bit."""
    cfg = _cfg("cartpole-a2c")  # its RMSprop state shows in the optimizer's tensors
    with ray_grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.updates >= 15, 45.0)
        tensors, meta, replay = runner.state(with_replay=False)
        assert meta["updates"] == runner.updates >= 15
        runner.restore(tensors, meta, replay)
        run_until(runner, lambda r, _: r.updates >= meta["updates"] + 15, 45.0)
        runner.freeze()
        version = runner.updates
        ours = {k: v.clone() for k, v in runner.aggregator.model.state_dict().items()}
    inline = InlineGradientRunner(gradient_program(cfg))
    with closing(inline):
        inline.restore(tensors, meta, replay)
        while inline.updates < version:
            assert inline.step().updates <= 1
        reference = inline.aggregator.model.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in ours.items())
        assert not torch.equal(tensors["online.policy.weight"], reference[
            "online.policy.weight"])  # it trained on after the checkpoint


@pytest.mark.slow
def test_cartpole_gorila_sync_learns_on_the_ray_cluster(cluster: RayCluster,
                                                        tmp_path: Path) -> None:
    cfg = qfleet.load_config("cartpole-gorila-sync", [
        "seed=0", "runtime.backend=ray", "log.progress=false", "log.tensorboard=false"])
    result = qfleet.train(cfg, tmp_path / "run")
    assert result.eval_return_mean >= 475.0, result
    assert result.env_steps <= cfg.train.total_env_steps


def test_workers_own_replays_go_into_the_checkpoint_and_come_back(cluster: RayCluster) -> None:
    from qfleet.checkpoint import with_prefix

    cfg = _cfg("cartpole-gorila-async", "learner.learning_starts=200")
    with ray_grad_runner(cfg) as runner:
        def both_filled(r: RayGradientRunner, reps: list[RoundReport]) -> bool:
            steps = [sum(x.steps_by_actor.get(w, 0) for x in reps) for w in (0, 1)]
            return r.updates >= 5 and min(steps) >= 300  # past learning_starts, each

        run_until(runner, both_filled, 60.0)
        tensors, meta, replay = runner.state(with_replay=True)
        parts = [with_prefix(replay, f"worker{i}.") for i in range(2)]
        collected = [int(p["worker.collected"][0]) for p in parts]
        assert min(collected) >= 200 and all(int(p["meta"][1]) > 0 for p in parts)
        runner.restore(tensors, meta, replay)
        # A refilling worker sends no gradient for 200 env steps; a restored one at once.
        start = runner.env_steps
        run_until(runner, lambda r, reps: _total(reps, "loss_count") > 0, 45.0)
        assert runner.env_steps - start < 200
        sizes = ray.get([s.handle.replay_state.remote(s.incarnation) for s in runner.slots])
        assert all(int(p["meta"][1]) >= int(q["meta"][1]) for p, q in zip(sizes, parts,
                                                                          strict=True))


def test_ray_sync_keeps_gradients_older_than_max_staleness_as_inline_does(
        cluster: RayCluster) -> None:
    """Staleness is the gate's rule and the gate applies none to sync groups: with pulls
    every 3 gradients and max_staleness 0, Ray used to drop what inline averages."""
    sets = ("algo.sync_every=3", "algo.max_staleness=0", "learner.learning_starts=16")
    cfg = _cfg("cartpole-gorila-sync", *sets)
    inline = InlineGradientRunner(gradient_program(cfg))
    with closing(inline):
        ref = run_until(inline, lambda r, _: r.updates >= 12, 45.0)
    with ray_grad_runner(cfg) as runner:
        reports = run_until(runner, lambda r, _: r.updates >= 12, 45.0)
    for reps in (ref, reports):
        assert _total(reps, "grads_dropped") == 0
        assert _total(reps, "staleness_sum") > 0  # gradients older than 0 updates ...
        assert _total(reps, "grads_applied") == 2 * _total(reps, "updates")  # ... all kept
