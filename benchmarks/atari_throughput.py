"""Atari collection on this machine: how fast qfleet's Ape-X actors feed replay next to the
env alone, and what a transition costs to move and to keep.

Env steps/s (agent steps: 4 frames each), random or greedy actions, no learner updates:
  (e) raw ale-py ``AtariVectorEnv``, the preset's num_envs, one thread per core, random
      actions: the env's own limit here, the reference;
  (g) Gymnasium's ``AsyncVectorEnv`` over AtariPreprocessing + FrameStackObservation (the
      path most peers build), one process per env, random actions;
  (r) the env qfleet builds + the preset's CNN batched greedy forward each step;
  (a) one Ape-X actor in this process; (b)/(c) 1 and 2 actor processes through the
      processes backend into the prioritized replay (benchmarks/actor_throughput.py).
Goal: (b) >= 0.8 x (e). Then bytes per transition as transports move them, each distinct
frame once (goal <= 1.25 x one 84x84 frame) and replay bytes for 1M transitions (goal <= 7.5 GB).

    python benchmarks/atari_throughput.py [--preset pong-apex] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import pickle
import time

import gymnasium as gym
import numpy as np
import torch
from actor_throughput import (
    Rate,
    actor_learner,
    config,
    in_process,
    raw_vector_env,
    through_processes,
)
from ale_py.vector_env import AtariVectorEnv

import qfleet
from qfleet.envs import make_env
from qfleet.replay import frame_codec
from qfleet.replay.frames import storage_nbytes

FRAME_BYTES = 84 * 84


def random_steps(env: gym.vector.VectorEnv, name: str, warmup: float, seconds: float) -> Rate:
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    steps, t_end = 0, time.perf_counter() + warmup + seconds
    t0 = 0.0
    while (now := time.perf_counter()) < t_end:
        if not t0 and now >= t_end - seconds:
            t0, steps = now, 0
        env.step(rng.integers(env.single_action_space.n, size=env.num_envs))  # type: ignore[attr-defined]
        steps += env.num_envs
    env.close()
    return Rate(name, steps, now - t0)


def raw_ale(cfg: qfleet.Config, warmup: float, seconds: float) -> Rate:
    game = gym.spec(cfg.env.id).kwargs["game"]
    env = AtariVectorEnv(game, cfg.env.num_envs, num_threads=os.cpu_count() or 1)
    return random_steps(env, "(e) raw AtariVectorEnv", warmup, seconds)


def gymnasium_async(cfg: qfleet.Config, warmup: float, seconds: float) -> Rate:
    env_cfg = cfg.env
    env_cfg.vector = "gymnasium"
    env = gym.vector.AsyncVectorEnv([lambda: make_env(env_cfg)] * env_cfg.num_envs)
    return random_steps(env, "(g) Gymnasium AsyncVectorEnv", warmup, seconds)


def bytes_per_transition(preset: str, num_envs: int) -> tuple[float, float, float]:
    """Bytes per transition of one chunk as stacks, as ChunkSlots moves it (the distinct
    frames + references) and pickled (Ray's object store, queues)."""
    program = actor_learner(config(preset, num_envs, 1, None))
    actor, steps = program.make_actor(0, 0), program.schedule.chunk_steps
    try:
        actor.collect(steps)  # past the first chunk
        data = actor.collect(steps).transitions
    finally:
        actor.close()
    coded, frames_KHW = frame_codec.encode(data.fields())
    n = len(data)
    return (sum(a.nbytes for a in data.fields().values()) / n,
            (frames_KHW.nbytes + sum(a.nbytes for a in coded.values())) / n,
            len(pickle.dumps(data, protocol=5)) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pong-apex")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wall time each")
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the workers and runtime.torch_threads = 1 do
    num_envs = qfleet.load_config(args.preset).env.num_envs
    print(f"{args.preset}: env.num_envs={num_envs}, {args.seconds:g} s each after "
          f"{args.warmup:g} s warm-up; {os.cpu_count()} CPUs", flush=True)
    rates = {}
    for key, fn, actors in (("e", raw_ale, 1), ("g", gymnasium_async, 1),
                            ("r", raw_vector_env, 1), ("a", in_process, 1),
                            ("b", through_processes, 1), ("c", through_processes, 2)):
        rates[key] = fn(config(args.preset, num_envs, actors, None), args.warmup, args.seconds)
        print(rates[key].line(), flush=True)
    raw = rates["e"].per_s
    for key, goal in (("g", ""), ("r", ""), ("a", ""), ("b", " (goal >= 0.8)"), ("c", "")):
        print(f"({key}) / (e): {rates[key].per_s / raw:.2f}{goal}")
    stacks, slots, pickled = bytes_per_transition(args.preset, num_envs)
    for name, sent in (("as 2 stacks (not sent)", stacks), ("ChunkSlots (processes)", slots),
                       ("pickled (Ray, queues)", pickled)):
        print(f"bytes per transition, {name:<22}: {sent:8,.0f} = {sent / FRAME_BYTES:.2f} "
              "84x84 frames (goal <= 1.25)")
    kept = storage_nbytes(1_000_000, (4, 84, 84), np.dtype(np.uint8))
    print(f"replay bytes for 1M transitions (frame-deduplicated storage): "
          f"{kept / 1e9:.2f} GB (goal <= 7.5)")


if __name__ == "__main__":
    main()
