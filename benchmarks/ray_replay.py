"""Ape-X on Ray with the replay in shard actors (``runtime.replay_on``) against the replay
in the learner's process (the reference, measured in the same run).

(1) Learner only: the cartpole-apex learner (real DQNLearner, 64-row batches, 8 batches per
    draw as the preset's learner.prefetch) trains for --seconds on shards filled with
    CartPole-shaped rows, reading from (a) a ShardedReplay in this process, (b) two shard
    actors with no batch asked for ahead (each draw waits for its round trip: the naive
    remote replay) and (c) with runtime.sample_requests = 8 batches asked for ahead.
    Updates/s, their ratio to (a), and the share of the wall time the learner waited.
(2) The whole run: cartpole-apex (2 actors) on a local Ray for --seconds after the first
    update, replay_on = learner / actors / learner_node: env steps/s and updates/s, and
    the ratio to replay_on = learner. On one 2-core machine the shard actors share the
    cores with everything else; on a cluster they sit on the actors' nodes.

    python benchmarks/ray_replay.py [--seconds 10] [--rows 20000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import ray
import torch

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.replay import Replay, Transitions
from qfleet.runtime import RayOptions
from qfleet.runtime.ray_common import LOCAL_SYSTEM_CONFIG
from qfleet.runtime.ray_replay import RemoteReplay, RemoteShardHost
from qfleet.runtime.ray_runner import RayRunner

PRESET = "cartpole-apex"


def apex_program(*sets: str) -> ActorLearnerProgram:
    cfg = qfleet.load_config(PRESET, ["runtime.backend=ray", "log.progress=false", *sets])
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    return program


def cartpole_rows(n: int, seed: int) -> tuple[Transitions, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    rows = Transitions(obs, rng.integers(0, 2, n), np.ones(n, np.float32),
                       np.full(n, 0.97, np.float32), obs + 0.01)
    return rows, rng.random(n) + 0.1  # initial |td|, as an Ape-X actor sends


# ------------------------------------------------------------------ (1) learner only

def learner_rate(replay: Replay, program: ActorLearnerProgram, seconds: float) -> dict[str, Any]:
    learner, group = program.make_learner(), program.schedule.prefetch
    rows = group * program.batch_size
    waited0 = getattr(replay, "waited_s", 0.0)
    for _ in range(3):  # warm-up: first allocations, first requests
        learner.update_many(replay.sample(rows), group)
    updates, t0 = 0, time.perf_counter()
    waited0 = getattr(replay, "waited_s", 0.0)
    while time.perf_counter() - t0 < seconds:
        batch = replay.sample(rows)
        stats = learner.update_many(batch, group)
        replay.update_priorities(batch.indices_B,
                                 torch.cat([s.td_abs_B for s in stats]).numpy())
        updates += group
    wall = time.perf_counter() - t0
    return {"updates_per_s": updates / wall,
            "waiting": (getattr(replay, "waited_s", 0.0) - waited0) / wall}


def learner_only(seconds: float, rows_per_shard: int) -> None:
    program = apex_program()
    local, make_shard = program.make_replay(), program.make_shard
    assert make_shard is not None
    shards: list[Any] = [RemoteShardHost.options(num_cpus=0).remote(
        lambda k=k: make_shard(k, 2)) for k in range(2)]
    for k in range(2):
        data, td = cartpole_rows(rows_per_shard, k)
        local.add(data, td, shard=k)
        ray.get(shards[k].add.remote(data, td))
    results = {"(a) in this process": learner_rate(local, program, seconds)}
    for requests in (0, 8):  # 0: each draw asked for only when needed (no prefetch)
        remote = RemoteReplay(shards, program.batch_size, requests, np.random.default_rng(0))
        remote._refresh()
        results[f"shard actors, {requests} ahead"] = learner_rate(remote, program, seconds)
    for shard in shards:
        ray.kill(shard)
    ref = results["(a) in this process"]["updates_per_s"]
    print(f"\n(1) learner only, {PRESET} learner, {program.schedule.prefetch} x "
          f"{program.batch_size}-row batches per draw, {seconds:.0f} s each")
    print(f"{'replay':<28}{'updates/s':>10}{'ratio':>8}{'waiting':>9}")
    for name, r in results.items():
        print(f"{name:<28}{r['updates_per_s']:>10.0f}{r['updates_per_s'] / ref:>8.2f}"
              f"{r['waiting']:>9.0%}")


# ------------------------------------------------------------------ (2) the whole run

def run_rate(replay_on: str, seconds: float) -> dict[str, float]:
    program = apex_program()
    runner = RayRunner(program, RayOptions(replay_on=replay_on, sample_requests=8))
    try:
        while runner.updates == 0:  # past learning_starts, the first update done
            runner.step()
        steps0, updates0, t0 = runner.env_steps, runner.updates, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            runner.step()
        wall = time.perf_counter() - t0
        return {"env_steps_per_s": (runner.env_steps - steps0) / wall,
                "updates_per_s": (runner.updates - updates0) / wall}
    finally:
        runner.close()


def whole_run(seconds: float) -> None:
    results = {where: run_rate(where, seconds) for where in ("learner", "actors",
                                                             "learner_node")}
    ref = results["learner"]
    print(f"\n(2) {PRESET} on a local Ray, 2 actors, {seconds:.0f} s after the first update")
    print(f"{'replay_on':<14}{'env steps/s':>12}{'ratio':>7}{'updates/s':>11}{'ratio':>7}")
    for where, r in results.items():
        print(f"{where:<14}{r['env_steps_per_s']:>12.0f}"
              f"{r['env_steps_per_s'] / ref['env_steps_per_s']:>7.2f}"
              f"{r['updates_per_s']:>11.0f}{r['updates_per_s'] / ref['updates_per_s']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per shard in (1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _system_config=LOCAL_SYSTEM_CONFIG)
    try:
        learner_only(args.seconds, args.rows)
        whole_run(args.seconds)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
