"""Actor throughput through the processes backend vs the same actor in-process, and the
shared-memory chunk transport rate for Atari-sized chunks.

Collection only, no learner updates (learner.learning_starts is set past anything the
measurement can reach). For the cartpole-apex preset shapes it measures env steps/s of
  (r) the floor: the same vector env (make_vec_env, same num_envs) stepped with the same
      network's batched greedy forward pass each step, nothing else (no exploration, no
      n-step, no priorities); (a)/(r) is what the actor's own work costs (goal >= 0.8);
  (a) the reference: one Actor (``build_program(cfg).make_actor(0, 0)``) calling
      ``collect(chunk_steps)`` in a loop in this process, no transport, no replay;
  (b) 1 actor process and (c) 2 actor processes through the real ProcessesRunner: forked
      workers, shared-memory chunk slots, the learner process copying every chunk into
      the prioritized replay; env steps counted as delivered into replay;
each for the same wall time after a warm-up, and prints (b)/(a) (goal >= 0.90) and
(c)/(b) (goal >= 1.7x). CPU use of every process over the window is printed too: on a
2-core machine the learner process copying chunks into replay competes with 2 actors.
(a) again with the actor's time accounting off (a NullClock) gives what the accounting
costs: on/off (goal >= 0.98).

Then the transport alone: a forked child writes Atari-sized chunks (obs (4, 84, 84) uint8,
--chunk-rows rows) into ChunkSlots and sends slot ids over a queue; this process views each
slot and copies it into a RingStorage as the replay does. Reported as MB/s of obs+next_obs
moved, against a plain in-process numpy copy of the same arrays into a ring (and an
in-process RingStorage.add, which writes by index like the replay).

    python benchmarks/actor_throughput.py [--seconds 10] [--repeats 2] [--num-envs 4]
        [--chunk-size N] [--chunk-rows 256]
"""

from __future__ import annotations

import argparse
import os
import queue
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import torch
from _common import (
    ATARI_OBS,
    NO_TRAINING,
    SOURCES,
    atari_chunks,
    busy_cores_s,
    cpu_seconds,
    new_ring,
    obs_mb,
)

import qfleet
from qfleet.algos import ActorLearnerProgram, build_program
from qfleet.envs import make_vec_env
from qfleet.replay import transition_spec
from qfleet.roles.clock import NullClock
from qfleet.runtime import ProcessesRunner
from qfleet.runtime.shm import ChunkSlots


@dataclass
class Rate:
    name: str
    env_steps: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core
    by_actor: list[float] = field(default_factory=list)
    others: float = 0.0  # cores busy with processes other than these (other users' jobs)

    @property
    def per_s(self) -> float:
        return self.env_steps / self.seconds

    def line(self) -> str:
        txt = f"{self.name:<26} {self.per_s:9.0f} env steps/s"
        if self.by_actor:
            txt += " (per actor: " + ", ".join(f"{r:.0f}" for r in self.by_actor) + ")"
        if self.cpu:
            txt += "; CPU " + ", ".join(f"{k} {v:.0%}" for k, v in self.cpu.items())
        return txt + f"; other processes {self.others:.0%}"

    def merge(self, other: Rate) -> Rate:
        """Pool two measurements of the same thing (rates weighted by time)."""
        t = self.seconds + other.seconds
        mix = {k: (v * self.seconds + other.cpu[k] * other.seconds) / t
               for k, v in self.cpu.items()}
        by_actor = [(a * self.seconds + b * other.seconds) / t
                    for a, b in zip(self.by_actor, other.by_actor, strict=True)]
        return Rate(self.name, self.env_steps + other.env_steps, t, mix, by_actor,
                    (self.others * self.seconds + other.others * other.seconds) / t)


def config(preset: str, num_envs: int, actors: int, chunk_size: int | None) -> qfleet.Config:
    chunk = [f"actors.chunk_size={chunk_size}"] if chunk_size else []
    return qfleet.load_config(preset, [
        f"env.num_envs={num_envs}", f"actors.count={actors}", *chunk,
        f"learner.learning_starts={NO_TRAINING}", "runtime.backend=processes",
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"])


def actor_learner(cfg: qfleet.Config) -> ActorLearnerProgram:
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram), "an actor-learner preset (dqn, apex)"
    return program


def in_process(cfg: qfleet.Config, warmup: float, seconds: float, clock: bool = True) -> Rate:
    program = actor_learner(cfg)
    actor = program.make_actor(0, 0)
    if not clock:  # the time accounting off, to measure what it costs
        actor.clock = NullClock()
    chunk_steps = program.schedule.chunk_steps
    try:
        t_end = time.perf_counter() + warmup
        while time.perf_counter() < t_end:
            actor.collect(chunk_steps)
        steps, cpu0, busy0 = 0, time.process_time(), busy_cores_s()
        t0 = time.perf_counter()
        while (now := time.perf_counter()) - t0 < seconds:
            steps += actor.collect(chunk_steps).env_steps
        cpu = (time.process_time() - cpu0) / (now - t0)
        others = (busy_cores_s() - busy0) / (now - t0) - cpu
    finally:
        actor.close()
    name = "(a) in-process actor" + ("" if clock else ", time accounting off")
    return Rate(name, steps, now - t0, {"this process": cpu}, others=others)


def raw_vector_env(cfg: qfleet.Config, warmup: float, seconds: float) -> Rate:
    net = actor_learner(cfg).make_eval_net().eval()
    env = make_vec_env(cfg.env)
    try:
        obs_EO, _ = env.reset(seed=cfg.seed)
        steps, t_end, t0 = 0, time.perf_counter() + warmup, 0.0
        measuring, cpu0, busy0 = False, 0.0, 0.0
        while (now := time.perf_counter()) - t0 < seconds or not measuring:
            if not measuring and now >= t_end:
                measuring, steps, t0 = True, 0, now
                cpu0, busy0 = time.process_time(), busy_cores_s()
            with torch.no_grad():
                action_E = net(torch.from_numpy(obs_EO)).argmax(dim=1).numpy()
            obs_EO, *_ = env.step(action_E)
            steps += env.num_envs
        cpu = (time.process_time() - cpu0) / (now - t0)
        others = (busy_cores_s() - busy0) / (now - t0) - cpu
    finally:
        env.close()
    return Rate("(r) raw vector env + forward", steps, now - t0, {"this process": cpu},
                others=others)


def no_clock(cfg: qfleet.Config, warmup: float, seconds: float) -> Rate:
    return in_process(cfg, warmup, seconds, clock=False)


def through_processes(cfg: qfleet.Config, warmup: float, seconds: float) -> Rate:
    runner = ProcessesRunner(actor_learner(cfg))
    try:
        t_end = time.perf_counter() + warmup  # fork, env creation, first chunks
        while time.perf_counter() < t_end:
            runner.step()
        pids = [w.process.pid for w in runner.workers]
        assert all(pid is not None for pid in pids)
        cpu0 = [cpu_seconds(pid) for pid in pids if pid is not None]
        main0, busy0 = time.process_time(), busy_cores_s()
        steps, by_actor = 0, [0] * len(pids)
        t0 = time.perf_counter()
        while (now := time.perf_counter()) - t0 < seconds:
            report = runner.step()
            steps += report.env_steps
            for i, n in report.steps_by_actor.items():
                by_actor[i] += n
        dt = now - t0
        cpu = {"learner": (time.process_time() - main0) / dt}
        for i, (pid, c0) in enumerate(zip(pids, cpu0, strict=True)):
            assert pid is not None
            cpu[f"actor {i}"] = (cpu_seconds(pid) - c0) / dt
        others = (busy_cores_s() - busy0) / dt - sum(cpu.values())
        assert runner.updates == 0, "the learner trained: learning_starts was reached"
    finally:
        runner.close()
    n = len(pids)
    return Rate(f"({'bc'[n - 1]}) {n} actor process{'es' if n > 1 else ''}", steps, dt, cpu,
                [s / dt for s in by_actor], others)


# ------------------------------------------------------------------ transport (Atari sizes)

def _writer(slots: ChunkSlots, out_q: Any, stop: Event, rows: int) -> None:
    chunks = atari_chunks(rows, SOURCES, seed=1)  # distinct data, no generation cost
    i = 0
    while not stop.is_set():
        try:
            slot = int(slots.free.get(timeout=0.1))
        except queue.Empty:
            continue
        out_q.put((slot, slots.write(slot, chunks[i % SOURCES], None)))
        i += 1
    out_q.cancel_join_thread()


def transport(rows: int, ring_rows: int, warmup: float,
              seconds: float) -> tuple[float, float, float]:
    """(MB/s, reader CPU share, writer CPU share) through ChunkSlots from a forked writer."""
    ctx = get_context("fork")
    slots = ChunkSlots(4, rows, transition_spec(ATARI_OBS, np.dtype(np.uint8)), ctx)
    ring = new_ring(ring_rows)
    out_q: Any = ctx.Queue()
    stop = ctx.Event()
    child = ctx.Process(target=_writer, args=(slots, out_q, stop, rows), daemon=True)
    child.start()
    assert child.pid is not None
    try:
        moved, t0, cpu0, child0 = 0, time.perf_counter() + warmup, 0.0, 0.0
        measuring = False
        while (now := time.perf_counter()) - t0 < seconds:
            if not measuring and now >= t0:
                measuring, moved, t0 = True, 0, now
                cpu0, child0 = time.process_time(), cpu_seconds(child.pid)
            slot, n = out_q.get(timeout=10.0)
            data, _ = slots.read(slot, n, False)
            ring.add(data)
            slots.free.put(slot)
            moved += n
        cpu = (time.process_time() - cpu0) / (now - t0)
        child_cpu = (cpu_seconds(child.pid) - child0) / (now - t0)
    finally:
        stop.set()
        child.join(timeout=5.0)
        if child.is_alive():
            child.kill()
        out_q.close()
        out_q.cancel_join_thread()
        slots.close()
    return obs_mb(moved) / (now - t0), cpu, child_cpu


def copy_in_process(rows: int, ring_rows: int, seconds: float, how: str) -> float:
    """MB/s of copying the same chunks into a ring in this process, one copy per byte:
    ``slice`` numpy slice assignment, ``add`` RingStorage.add (index writes, as the replay),
    ``slots-add`` RingStorage.add from views of shared-memory ChunkSlots (no second process:
    the reader's half of the transport alone)."""
    chunks = atari_chunks(rows, SOURCES, seed=1)
    sources = chunks
    if how == "slots-add":
        slots = ChunkSlots(SOURCES, rows, transition_spec(ATARI_OBS, np.dtype(np.uint8)),
                           get_context("fork"))
        for slot, chunk in enumerate(chunks):
            slots.write(slot, chunk, None)
        sources = [slots.read(slot, rows, False)[0] for slot in range(SOURCES)]
    ring = new_ring(ring_rows)
    obs, nxt = ring.arrays["obs_NO"], ring.arrays["next_obs_NO"]
    moved, i, pos = 0, 0, 0
    t0 = time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        chunk = sources[i % SOURCES]
        if how == "slice":
            if pos + rows > ring_rows:
                pos = 0
            obs[pos: pos + rows] = chunk.obs_NO
            nxt[pos: pos + rows] = chunk.next_obs_NO
            pos += rows
        else:
            ring.add(chunk)
        moved += rows
        i += 1
    if how == "slots-add":
        slots.close()
    return obs_mb(moved) / (now - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cartpole-apex")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="actors.chunk_size (vector steps per chunk; default the preset's)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wall time each")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of a, b, c")
    parser.add_argument("--chunk-rows", type=int, default=64 * 4,
                        help="rows per Atari-sized transport chunk (64 steps x 4 envs)")
    parser.add_argument("--ring-rows", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the workers and runtime.torch_threads = 1 do

    chunk = config(args.preset, args.num_envs, 1, args.chunk_size).actors.chunk_size
    print(f"{args.preset}, env.num_envs={args.num_envs}, actors.chunk_size={chunk}, "
          f"{args.seconds:g} s each after "
          f"{args.warmup:g} s warm-up, {args.repeats} interleaved round(s); "
          f"{os.cpu_count()} CPUs", flush=True)
    pooled: dict[str, Rate] = {}
    for _ in range(args.repeats):  # interleaved, so other users' jobs hit all three alike
        for key, fn, actors in (("raw", raw_vector_env, 1), ("ref", in_process, 1),
                                ("off", no_clock, 1),
                                ("one", through_processes, 1), ("two", through_processes, 2)):
            cfg = config(args.preset, args.num_envs, actors, args.chunk_size)
            got = fn(cfg, args.warmup, args.seconds)
            print(got.line(), flush=True)
            pooled[key] = pooled[key].merge(got) if key in pooled else got
    raw, ref, one, two = pooled["raw"], pooled["ref"], pooled["one"], pooled["two"]
    if args.repeats > 1:
        print("pooled over the rounds:")
        for got in (raw, ref, pooled["off"], one, two):
            print(got.line())
    print(f"in-process actor / raw vector env + forward: {ref.per_s / raw.per_s:.2f} "
          "(goal >= 0.8)")
    print(f"time accounting on / off: {ref.per_s / pooled['off'].per_s:.3f} (goal >= 0.98: "
          "it costs at most 2% of env steps/s)")
    print(f"1 process / in-process: {one.per_s / ref.per_s:.2f} (goal >= 0.90)")
    print(f"2 processes / 1 process: {two.per_s / one.per_s:.2f}x (goal >= 1.7x; "
          f"{os.cpu_count()} CPUs shared by 2 actors and the learner process, which "
          f"used {two.cpu['learner']:.0%} of a core copying chunks into replay)", flush=True)

    mb = obs_mb(args.chunk_rows)
    print(f"\ntransport: obs {ATARI_OBS} uint8, {args.chunk_rows}-row chunks "
          f"({mb:.1f} MB of obs+next_obs each), ring of {args.ring_rows} rows", flush=True)
    rate, cpu, writer_cpu = transport(args.chunk_rows, args.ring_rows, args.warmup,
                                      args.seconds)
    copies = {how: copy_in_process(args.chunk_rows, args.ring_rows, args.seconds / 2, how)
              for how in ("slice", "add", "slots-add")}
    plain, ring = copies["slice"], copies["add"]
    print(f"ChunkSlots, forked writer -> RingStorage.add: {rate:7.0f} MB/s "
          f"(CPU: reader {cpu:.0%}, writer {writer_cpu:.0%})")
    print(f"in-process numpy slice copy into a ring:     {plain:7.0f} MB/s  (reference)")
    print(f"in-process RingStorage.add (index writes):   {ring:7.0f} MB/s")
    print(f"in-process RingStorage.add from slot views:  {copies['slots-add']:7.0f} MB/s  "
          "(the reader's copy alone)")
    print(f"transport / plain copy: {rate / plain:.2f}; transport / RingStorage.add: "
          f"{rate / ring:.2f}; {rate / mb:.0f} chunks/s = "
          f"{rate / mb * args.chunk_rows:.0f} Atari transitions/s")


if __name__ == "__main__":
    main()
