"""What the Ray backend costs against the processes backend on this machine.

(1) Ape-X collection throughput: the same actor count through the real ProcessesRunner
    (the reference, measured in this run) and the real RayRunner on a local Ray instance,
    collection only (learner.learning_starts is set past anything the run can reach); env
    steps/s counted as delivered into replay, and the ratio ray / processes (goal >= 0.8).
    Also env steps per CPU second of the whole process tree (driver, workers and, for Ray,
    raylet, GCS and agents): on a shared machine wall-clock rates follow the other load.
(2) Parameter broadcast: ray.put of a ParamSnapshot plus every actor's ray.get of it (the
    Ray path of a new version), against SharedParams.publish + pull (the processes path),
    for the preset's MLP and for a Nature-CNN Q-network (Atari sizes).
(3) Chunk transport: a Ray actor returns Atari-sized chunks (obs (4, 84, 84) uint8) through
    the object store, the driver copies each into a RingStorage as the replay does; MB/s of
    obs+next_obs, against a plain in-process copy of the same arrays into a ring.
(4) Gradient schemes: cartpole-gorila-sync with W = 2 workers, global updates/s on the
    real RayGradientRunner (all_gather among the workers, through shared memory on one
    machine, each steps its replica,
    several rounds per Ray call) against the real ProcessesGradientRunner (shared memory,
    the reference, same run), after the replays filled and a warm-up; the ratio
    ray / processes (goal >= 0.8, issue 15).

    python benchmarks/ray_overhead.py [--seconds 10] [--actors 2] [--repeats 1]
        [--chunk-rows 256] [--parts 1234]
"""

from __future__ import annotations

import argparse
import os
import time
from multiprocessing import get_context
from typing import Any

import numpy as np
import ray
import torch
from _common import (
    ATARI_OBS,
    NO_TRAINING,
    SOURCES,
    atari_chunks,
    new_ring,
    obs_mb,
    proc_stat,
    stat_cpu_s,
)
from torch import nn

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.config import NetConfig
from qfleet.nets import make_q_network
from qfleet.replay import Transitions
from qfleet.roles import ParamSnapshot
from qfleet.runtime import ProcessesGradientRunner, ProcessesRunner
from qfleet.runtime.ray_gradients import RayGradientRunner
from qfleet.runtime.ray_runner import LOCAL_SYSTEM_CONFIG, RayRunner
from qfleet.runtime.shm import SharedParams


def program(preset: str, actors: int, num_envs: int) -> ActorLearnerProgram:
    cfg = qfleet.load_config(preset, [
        f"actors.count={actors}", f"env.num_envs={num_envs}",
        f"learner.learning_starts={NO_TRAINING}", "log.progress=false",
        "log.tensorboard=false", "checkpoint.every=0"])
    built = build_program(cfg)
    assert isinstance(built, ActorLearnerProgram)
    return built


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process and all its descendants that are running:
    forked actor workers, or Ray's raylet, GCS, agents and actor workers (Linux /proc)."""
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(entry)
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = stat_cpu_s(fields)
    tree, frontier = {os.getpid()}, {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - tree
        tree |= frontier
    return sum(cpu.get(p, 0.0) for p in tree)


def collect_rate(runner: ProcessesRunner | RayRunner, warmup: float,
                 seconds: float) -> tuple[float, float]:
    """(env steps/s delivered into replay, env steps per CPU second of the whole process
    tree), measured after every actor delivered once and a warm-up."""
    seen: set[int] = set()
    t_end = time.perf_counter() + 120.0
    while len(seen) < runner.program.num_actors:  # actor processes start, import, reset
        seen |= set(runner.step().steps_by_actor)
        assert time.perf_counter() < t_end, "actors never delivered"
    t_end = time.perf_counter() + warmup
    while time.perf_counter() < t_end:
        runner.step()
    steps, t0, cpu0 = 0, time.perf_counter(), tree_cpu_s()
    while (now := time.perf_counter()) - t0 < seconds:
        steps += runner.step().env_steps
    cpu = tree_cpu_s() - cpu0
    assert runner.updates == 0, "the learner trained: learning_starts was reached"
    return steps / (now - t0), steps / max(cpu, 1e-9)


def throughput(args: argparse.Namespace) -> None:
    print(f"(1) collection, {args.preset}, {args.actors} actors x env.num_envs={args.num_envs}, "
          f"{args.seconds:g} s each after a {args.warmup:g} s warm-up; {os.cpu_count()} CPUs",
          flush=True)
    rates: dict[str, list[tuple[float, float]]] = {"processes": [], "ray": []}
    for _ in range(args.repeats):  # interleaved, so other jobs on the machine hit both alike
        for name in rates:
            prog = program(args.preset, args.actors, args.num_envs)
            runner = ProcessesRunner(prog) if name == "processes" else RayRunner(prog)
            try:
                rates[name].append(collect_rate(runner, args.warmup, args.seconds))
            finally:
                runner.close()
            rate, per_cpu = rates[name][-1]
            print(f"    {name:<10} {rate:9.0f} env steps/s, {per_cpu:6.0f} per CPU second",
                  flush=True)
    (proc, proc_cpu), (on_ray, ray_cpu) = (np.mean(rates[k], axis=0) for k in rates)
    print(f"processes (reference) {proc:9.0f} env steps/s {proc_cpu:7.0f} per CPU second\n"
          f"ray                   {on_ray:9.0f} env steps/s {ray_cpu:7.0f} per CPU second\n"
          f"ray / processes: {on_ray / proc:.2f} in env steps/s (goal >= 0.8), "
          f"{ray_cpu / proc_cpu:.2f} in env steps per CPU second (the machine's other load "
          "does not move this one)", flush=True)


# ------------------------------------------------------------------ parameter broadcast

@ray.remote(num_cpus=0)
class Reader:
    """Stands in for an actor: fetches the published snapshot and loads it into a net."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def load(self, params: list[ray.ObjectRef]) -> int:
        snapshot: ParamSnapshot = ray.get(params[0])
        self.net.load_state_dict(snapshot.params)
        return snapshot.version

    def ping(self) -> int:
        return 0


def broadcast(net: nn.Module, readers: int, repeats: int) -> tuple[float, float, float]:
    """(ray put+get ms, bare call round trip ms, SharedParams publish+pull ms), medians."""
    actors = [Reader.remote(net) for _ in range(readers)]  # type: ignore[attr-defined]
    ray.get([a.ping.remote() for a in actors])
    on_ray, calls, shm = [], [], []
    for version in range(repeats):
        t0 = time.perf_counter()
        ref = ray.put(ParamSnapshot.of(net, version))
        assert ray.get([a.load.remote([ref]) for a in actors]) == [version] * readers
        on_ray.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get([a.ping.remote() for a in actors])
        calls.append(time.perf_counter() - t0)
    params = SharedParams(net, get_context("fork"))
    for version in range(repeats):
        t0 = time.perf_counter()
        params.publish(net, version)
        for _ in range(readers):  # each actor pulls its private copy (here one by one)
            snapshot = params.pull(version - 1)
            assert snapshot is not None
        shm.append(time.perf_counter() - t0)
    for a in actors:
        ray.kill(a)
    return ms(on_ray), ms(calls), ms(shm)


def ms(seconds: list[float]) -> float:
    return 1e3 * float(np.median(seconds))


def broadcasts(args: argparse.Namespace) -> None:
    nets = {"cartpole MLP [256, 256]": make_q_network(NetConfig(), (4,), 2),
            "Nature CNN (4, 84, 84)": make_q_network(NetConfig(torso="cnn"), ATARI_OBS, 6)}
    print(f"\n(2) parameter broadcast to {args.actors} actors (median of {args.repeats * 10})")
    for name, net in nets.items():
        mb = sum(v.numel() * v.element_size() for v in net.state_dict().values()) / 1e6
        put_get, call, shm = broadcast(net, args.actors, args.repeats * 10)
        print(f"{name:<24} {mb:5.2f} MB: ray.put + actors' get {put_get:6.2f} ms "
              f"(a bare call round trip {call:.2f} ms); SharedParams publish + pulls "
              f"{shm:6.2f} ms (reference); ratio {put_get / shm:.1f}x", flush=True)


# ------------------------------------------------------------------ chunk transport

@ray.remote(num_cpus=1)
class ChunkSource:
    def __init__(self, rows: int) -> None:
        self.chunks, self.i = atari_chunks(rows, SOURCES, seed=1), 0

    def next(self) -> Transitions:
        self.i += 1
        return self.chunks[self.i % SOURCES]


def through_object_store(rows: int, ring_rows: int, warmup: float, seconds: float) -> float:
    source: Any = ChunkSource.remote(rows)  # type: ignore[attr-defined]
    ring = new_ring(ring_rows)
    calls = [source.next.remote() for _ in range(2)]  # two in flight, as the runner keeps
    moved, t0, measuring = 0, time.perf_counter() + warmup, False
    while (now := time.perf_counter()) - t0 < seconds:
        if not measuring and now >= t0:
            measuring, moved, t0 = True, 0, now
        ring.add(ray.get(calls.pop(0)))  # a read-only view of the object store, copied
        calls.append(source.next.remote())
        moved += rows
    ray.kill(source)
    return obs_mb(moved) / (now - t0)


def plain_copy(rows: int, ring_rows: int, seconds: float) -> float:
    chunks, ring, pos = atari_chunks(rows, SOURCES, seed=1), new_ring(ring_rows), 0
    obs, nxt = ring.arrays["obs_NO"], ring.arrays["next_obs_NO"]
    moved, t0 = 0, time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        chunk = chunks[(moved // rows) % SOURCES]
        pos = 0 if pos + rows > ring_rows else pos
        obs[pos: pos + rows] = chunk.obs_NO
        nxt[pos: pos + rows] = chunk.next_obs_NO
        pos += rows
        moved += rows
    return obs_mb(moved) / (now - t0)


def transport(args: argparse.Namespace) -> None:
    rows = args.chunk_rows
    print(f"\n(3) chunk transport: obs {ATARI_OBS} uint8, {rows}-row chunks "
          f"({obs_mb(rows):.1f} MB of obs+next_obs each), ring of {args.ring_rows} rows")
    rate = through_object_store(rows, args.ring_rows, args.warmup, args.seconds)
    plain = plain_copy(rows, args.ring_rows, args.seconds / 2)
    print(f"Ray object store -> RingStorage.add:   {rate:7.0f} MB/s "
          f"({rate / obs_mb(rows) * rows:.0f} Atari transitions/s)\n"
          f"in-process numpy copy into a ring:     {plain:7.0f} MB/s (reference)\n"
          f"object store / plain copy: {rate / plain:.2f}", flush=True)


# ------------------------------------------------------------------ gradient schemes

def update_rate(runner: ProcessesGradientRunner | RayGradientRunner, warmup: float,
                seconds: float) -> float:
    """Global updates/s, the clock started once updates began (worker start and replay
    fill excluded) and a warm-up passed."""
    t_end = time.perf_counter() + 120.0
    while runner.updates == 0:
        runner.step()
        assert time.perf_counter() < t_end, "no global update in 120 s"
    t_end = time.perf_counter() + warmup
    while time.perf_counter() < t_end:
        runner.step()
    updates, t0 = runner.updates, time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        runner.step()
    return (runner.updates - updates) / (now - t0)


def gradients(args: argparse.Namespace) -> None:
    print(f"\n(4) gradient scheme: cartpole-gorila-sync, W = 2 workers, {args.seconds:g} s "
          "each after the replays filled and a warm-up", flush=True)
    rates: dict[str, list[float]] = {"processes": [], "ray": []}
    for _ in range(args.repeats):  # interleaved, as in (1)
        for name in rates:
            prog = build_program(qfleet.load_config("cartpole-gorila-sync", [
                "actors.count=2", "log.progress=false", "log.tensorboard=false"]))
            assert isinstance(prog, GradientProgram)
            runner = ProcessesGradientRunner(prog) if name == "processes" \
                else RayGradientRunner(prog)
            try:
                rates[name].append(update_rate(runner, args.warmup, args.seconds))
            finally:
                runner.close()
            print(f"    {name:<10} {rates[name][-1]:7.1f} global updates/s", flush=True)
    proc, on_ray = (float(np.mean(rates[k])) for k in rates)
    print(f"processes (reference) {proc:7.1f} global updates/s\n"
          f"ray                   {on_ray:7.1f} global updates/s\n"
          f"ray / processes: {on_ray / proc:.2f} (goal >= 0.8; the members share this "
          "machine, so a Ray round gathers through a mapped file, runtime/node_exchange)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cartpole-apex")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wall time each")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of (1)")
    parser.add_argument("--chunk-rows", type=int, default=64 * 4)
    parser.add_argument("--ring-rows", type=int, default=8192)
    parser.add_argument("--parts", default="1234", help="which measurements to run, e.g. 14")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as runtime.torch_threads = 1 does
    # One local Ray instance for the whole script, no dashboard: its processes would take
    # CPU from the actors being measured. The runner finds Ray started and leaves it up.
    ray.init(num_cpus=max(os.cpu_count() or 1, args.actors + 1), include_dashboard=False,
             object_store_memory=512 * 2**20, log_to_driver=False,
             _system_config=LOCAL_SYSTEM_CONFIG)  # actors at nice 0, as the runner's own
    try:
        for part, run in (("1", throughput), ("2", broadcasts), ("3", transport),
                          ("4", gradients)):
            if part in args.parts:
                run(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
