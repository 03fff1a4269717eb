"""Ape-X replay shards as Ray actors (``runtime.replay_on``), on a real multi-node Ray
cluster on this machine (``conftest.cluster``: a head without CPUs, two 2-CPU workers).

The sampling rule is checked against the naive reference (p_i / sum over every shard,
IS weights (p_i / p_min)^-beta), placement by asking the actors where they run, and the
loss of a node by killing one."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from _runners import closing, run_until  # noqa: E402
from test_ray import SMALL, WORKER, RayCluster, actors_die  # noqa: E402

import qfleet  # noqa: E402
from qfleet.algos import build_program  # noqa: E402
from qfleet.config import ConfigError  # noqa: E402
from qfleet.replay import PrioritizedReplay, RingStorage, Transitions  # noqa: E402
from qfleet.runtime import RayOptions, make_runner  # noqa: E402
from qfleet.runtime.ray_replay import RemoteReplay, RemoteShardHost  # noqa: E402
from qfleet.runtime.ray_runner import RayRunner  # noqa: E402


def _runner(replay_on: str, *extra: str) -> AbstractContextManager[RayRunner]:
    cfg = qfleet.load_config("cartpole-apex", [*SMALL, *extra])
    runner = make_runner("ray", build_program(cfg), RayOptions(replay_on=replay_on,
                                                              sample_requests=3))
    assert isinstance(runner, RayRunner)
    return closing(runner, actors_die("node_id"))


def _shard_nodes(runner: RayRunner) -> list[str]:
    return list(ray.get([h.node_id.remote() for h in runner.shards]))


def _shard_added(runner: RayRunner, timeout_s: float = 30.0) -> list[int]:
    """Rows each shard actor was ever sent; asks again while one is restarting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return [s.added for s in ray.get([h.stats.remote() for h in runner.shards])]
        except ray.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _rows(n: int, start: int) -> Transitions:
    obs = np.arange(start, start + n, dtype=np.float32)[:, None]
    return Transitions(obs, np.zeros(n, np.int64), np.zeros(n, np.float32),
                       np.ones(n, np.float32), obs + 0.5)


def _new_shard() -> PrioritizedReplay:
    return PrioritizedReplay(RingStorage(64, (1,), np.dtype(np.float32)),
                             np.random.default_rng(3), alpha=0.6, beta0=0.4)


# ------------------------------------------------------------------ the sampling rule

def test_remote_sampling_draws_each_row_by_its_share_of_all_shards(
        cluster: RayCluster) -> None:
    """Two shard actors hold rows with known |td|: over many draws every row comes up in
    proportion p_i / sum over both shards, and its IS weight is (p_i / p_min)^-beta."""
    shards = [RemoteShardHost.options(num_cpus=0).remote(_new_shard) for _ in range(2)]
    try:
        td = {0: np.arange(1.0, 11.0), 1: np.array([20.0, 30.0, 40.0, 50.0, 60.0])}
        ray.get([shards[k].add.remote(_rows(len(td[k]), 100 * k), td[k]) for k in (0, 1)])
        replay = RemoteReplay(shards, batch_size=32, requests=4,
                              rng=np.random.default_rng(0))
        replay._refresh()
        obs_of_prio = {100 * k + i: (t + 1e-6) ** 0.6 for k in (0, 1)
                       for i, t in enumerate(td[k])}
        counts: Counter[float] = Counter()
        for _ in range(300):
            batch = replay.sample(64)
            obs_B = batch.data.obs_NO[:, 0]
            counts.update(obs_B.tolist())
            prio_B = np.array([obs_of_prio[int(o)] for o in obs_B])
            assert batch.weights_B is not None
            expect_B = (prio_B / min(obs_of_prio.values())) ** -replay.beta
            np.testing.assert_allclose(batch.weights_B, expect_B, rtol=1e-5)
            assert np.array_equal(batch.data.next_obs_NO[:, 0], obs_B + 0.5)
        total, n = sum(obs_of_prio.values()), sum(counts.values())
        expected = {o: n * p / total for o, p in obs_of_prio.items()}
        chi2 = sum((counts[o] - e) ** 2 / e for o, e in expected.items())
        assert chi2 < 36.1, (chi2, counts)  # 14 degrees of freedom, p = 0.001
        assert len(replay.pending) > 0  # batches stay requested ahead
    finally:
        for shard in shards:
            ray.kill(shard, no_restart=True)


def test_priorities_go_back_to_their_shard_unless_it_was_lost_since(
        cluster: RayCluster) -> None:
    shards = [RemoteShardHost.options(num_cpus=0).remote(_new_shard) for _ in range(2)]
    try:
        ray.get([s.add.remote(_rows(8, 10 * k), np.ones(8)) for k, s in enumerate(shards)])
        replay = RemoteReplay(shards, batch_size=16, requests=1,
                              rng=np.random.default_rng(1))
        replay._refresh()
        batch = replay.sample(16)
        replay.lost(1)  # shard 1 "restarted": updates for rows drawn before are void
        replay.update_priorities(batch.indices_B, np.full(16, 9.0))
        assert all(len(u) <= 1 for u in replay.updates)  # waiting for the next draw
        replay.flush()
        prio = [ray.get(s.state.remote())["prio.priority_N"][:8] for s in shards]
        drawn = {k: {int(o) - 10 * k for o in batch.data.obs_NO[:, 0] if o // 10 == k}
                 for k in (0, 1)}
        assert drawn[0] and drawn[1], drawn  # both shards were drawn from
        new = (9.0 + 1e-6) ** 0.6
        np.testing.assert_allclose(prio[0][sorted(drawn[0])], new)
        np.testing.assert_allclose(prio[1], 1.0 + 0.0 * prio[1], rtol=1e-5)  # untouched
    finally:
        for shard in shards:
            ray.kill(shard, no_restart=True)


# ------------------------------------------------------------------ placement and training

def test_shards_sit_beside_their_actors_and_the_learner_trains_from_them(
        cluster: RayCluster) -> None:
    with _runner("actors") as runner:  # until both actors delivered (one may start later)
        reports = run_until(runner, lambda r, reps: r.updates >= 200 and {
            a for x in reps for a in x.steps_by_actor} == {0, 1}, 90.0)
        actor_nodes, shard_nodes = runner.node_ids(), _shard_nodes(runner)
        assert shard_nodes == actor_nodes, (shard_nodes, actor_nodes)
        assert len(set(actor_nodes)) == 2
        assert isinstance(runner.replay, RemoteReplay)
        assert all(a > 0 for a in _shard_added(runner))
        # The learner counted every step the actors wrote (up to the last call's rows).
        assert sum(_shard_added(runner)) >= runner.env_steps - 2 * 2 * 16 * 2 * 4
        assert len(runner.replay.pending) > 0  # requests on their way while it computes
        assert {a for r in reports for a in r.steps_by_actor} == {0, 1}


def test_shards_on_the_learner_node(cluster: RayCluster) -> None:
    with _runner("learner_node") as runner:
        run_until(runner, lambda r, _: r.updates >= 100, 60.0)
        here = ray.get_runtime_context().get_node_id()
        assert _shard_nodes(runner) == [here, here]
        assert here not in runner.node_ids()  # the head has no CPUs for the actors


def test_a_checkpoint_of_shard_actors_resumes_with_the_replay_in_the_learner(
        cluster: RayCluster) -> None:
    """The shard actors' checkpoint has ShardedReplay's layout: either placement loads it."""
    with _runner("actors") as remote:
        run_until(remote, lambda r, _: r.updates >= 50, 60.0)
        tensors, meta, replay = remote.state(with_replay=True)
        # What the checkpoint holds (the actors write on after it: ask the arrays, not
        # the shards).
        sizes = [int(replay[f"shard{k}.meta"][1]) for k in (0, 1)]
    with _runner("learner") as local:
        local.restore(tensors, meta, replay)
        assert [len(local.replay.shards[k]) for k in (0, 1)] == sizes  # type: ignore[attr-defined]
        assert local.updates == meta["updates"]
        run_until(local, lambda r, _: r.updates >= meta["updates"] + 20, 60.0)
        back = local.state(with_replay=True)
    with _runner("actors") as again:
        again.restore(*back)
        assert sum(s.size for s in ray.get([h.stats.remote() for h in again.shards])) == \
            len(local.replay)


def test_lost_node_loses_only_its_shard(cluster: RayCluster) -> None:
    try:
        with _runner("actors") as runner:
            run_until(runner, lambda r, _: r.updates >= 50, 60.0)
            nodes = runner.node_ids()
            victim = next(n for n in cluster.workers if n.node_id == nodes[0])
            lost = [i for i, n in enumerate(nodes) if n == victim.node_id]
            kept = [i for i in range(2) if i not in lost]
            before = _shard_added(runner)
            cluster.cluster.remove_node(victim, allow_graceful=False)
            cluster.workers.remove(victim)
            # A checkpoint now waits for the lost shard to come back (empty) and keeps
            # every row of the others.
            _, _, saved = runner.state(with_replay=True)
            assert all(int(saved[f"shard{i}.prio.added"][0]) >= before[i] for i in kept)

            def recovered(r: RayRunner, reps: list) -> bool:
                return any(x.actor_restarts for x in reps) and not any(
                    s.recovering for s in r.slots) and all(a > 0 for a in _shard_added(r))

            updates = runner.updates
            reports = run_until(runner, recovered, 90.0)
            run_until(runner, lambda r, _: r.updates >= updates + 50, 60.0)
            after = _shard_added(runner)
            assert sum(r.actor_restarts for r in reports) >= len(lost)
            assert all(after[i] >= before[i] for i in kept)  # nothing delivered was lost
            assert victim.node_id not in _shard_nodes(runner)
            assert _shard_nodes(runner) == runner.node_ids()  # still beside their actors
    finally:
        while len(cluster.workers) < 2:
            cluster.workers.append(cluster.cluster.add_node(**WORKER))
        cluster.cluster.wait_for_nodes()


# ------------------------------------------------------------------ config

@pytest.mark.parametrize(("sets", "needle"), [
    (["runtime.replay_on='actors'"], "only the ray backend"),
    (["runtime.backend='ray'", "runtime.replay_on='actors'", "algo.name='a2c'"],
     "only dqn and apex"),
    (["runtime.learner_host='actor'"], "only the ray backend"),
    (["runtime.backend='ray'", "runtime.sample_requests=0"], "runtime.sample_requests"),
])
def test_ray_placement_fields_say_what_is_allowed(sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        qfleet.load_config("cartpole-apex", ["runtime.backend='processes'", *sets])


@pytest.mark.slow
def test_cartpole_apex_learns_from_shard_actors(cluster: RayCluster, tmp_path: Path) -> None:
    cfg = qfleet.load_config("cartpole-apex", [
        "seed=0", "runtime.backend=ray", "runtime.replay_on=actors", "log.progress=false",
        "log.tensorboard=false"])
    result = qfleet.train(cfg, tmp_path / "run")
    assert result.eval_return_mean >= 475.0, result
    assert result.env_steps <= cfg.train.total_env_steps
