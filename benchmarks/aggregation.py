"""Gradient aggregation on the processes backend: global updates/s and env steps/s for
W = 1 and W = 2 gradient workers, per scheme, measured in one run on this machine.

Schemes (each from its CartPole preset, ``runtime.backend = "processes"``, torch threads 1):
  gorila sync     cartpole-gorila-sync; sync needs W >= 2, so its W = 1 reference is the
                  same preset with ``algo.aggregation = "async"`` and one worker: the same
                  single-worker computation (gradient on the worker, one global step each);
  gorila async    cartpole-gorila-async: each worker is a group of one that steps the
                  shared-memory model in its turn;
  grouped         cartpole-batchsync: W = 1 (G = 1), W = 2 with G = 1 and with G = 2 (the
                  interesting pair: async vs sync inside one group), and W = 4, G = 2
                  (each group's members reduce among themselves and step a
                  shared-memory model);
  a2c             cartpole-a2c: W = 1 and W = 2 (sync: the workers reduce among
                  themselves and each steps its own replica; W = 1 is a group of one);
  a3c hogwild     cartpole-a3c: workers apply their gradients lock-free to a shared-memory
                  model and only report to the main process;
  dper            cartpole-dper (W = 2, sync): each worker adds to its own prioritized shard
                  in shared memory and samples every shard; its reference is the same
                  preset with each worker's own local replay (replay.scope = local): the
                  ratio of their env steps/s is what sharing the replay costs (goal
                  >= 0.8x).
Runners are driven directly (build_program + make_runner). The clock starts only once
updates have started (worker start and replay fill excluded), then runs a warm-up and
then the measured window. Printed per run: global updates/s (the change of the global
version), env steps/s (steps counted into the global side), mean staleness
(staleness_sum / grads_applied), gradients dropped as too stale, CPU of the main process
(it counts the reports) and of the workers (shares of one core), env steps per CPU-second of
this benchmark's processes, and cores busy with other processes; then the scaling ratio
W = 2 / W = 1 per scheme (goals: >= 1.7x for async and A3C; env steps/s >= 1.5x with
updates/s kept for gorila sync and A2C, >= 1.3x for grouped W = 4, G = 2).

    python benchmarks/aggregation.py [--seconds 8] [--warmup 2] [--repeats 2] [--no-w4]
                                     [--only grouped --only a2c ...]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
from _common import busy_cores_s, cpu_seconds

import qfleet
from qfleet.algos import build_program
from qfleet.runtime import ProcessesGradientRunner, make_runner

START_TIMEOUT_S = 120.0  # worker start + replay fill must reach the first update by then
GOAL = 1.7
SYNC_GOAL = 1.5  # gorila sync and A2C, W = 2 over W = 1 env steps/s (issue 19)
GROUPED_GOAL = 1.3  # grouped W = 4, G = 2 over W = 1
DPER_GOAL = 0.8  # dper's env steps/s over the same run with local replays (issue 15)


@dataclass(frozen=True)
class Case:
    scheme: str
    preset: str
    workers: int
    overrides: tuple[str, ...] = ()
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.scheme} W={self.workers}" + (f" {self.note}" if self.note else "")


@dataclass
class Measured:
    case: Case
    seconds: float
    updates: int
    env_steps: int
    applied: int
    dropped: int
    staleness_sum: int
    main_cpu: float
    workers_cpu: float
    others: float

    @property
    def updates_per_s(self) -> float:
        return self.updates / self.seconds

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.seconds

    @property
    def staleness(self) -> float | None:
        return self.staleness_sum / self.applied if self.applied else None

    def merge(self, other: Measured) -> Measured:
        """Pool two measurements of the same case (CPU shares weighted by time)."""
        t = self.seconds + other.seconds

        def mix(a: float, b: float) -> float:
            return (a * self.seconds + b * other.seconds) / t

        return Measured(self.case, t, self.updates + other.updates,
                        self.env_steps + other.env_steps, self.applied + other.applied,
                        self.dropped + other.dropped, self.staleness_sum + other.staleness_sum,
                        mix(self.main_cpu, other.main_cpu),
                        mix(self.workers_cpu, other.workers_cpu), mix(self.others, other.others))

    def row(self) -> str:
        stale = f"{self.staleness:9.2f}" if self.staleness is not None else f"{'-':>9}"
        cpu_s = (self.main_cpu + self.workers_cpu) * self.seconds
        return (f"{self.case.label:<34} {self.updates_per_s:9.1f} {self.steps_per_s:10.0f} "
                f"{stale} {self.dropped:7d} {self.main_cpu:8.0%} {self.workers_cpu:8.0%} "
                f"{self.env_steps / cpu_s:11.0f} {self.others:7.0%}")


HEADER = (f"{'scheme':<34} {'updates/s':>9} {'env st/s':>10} {'staleness':>9} {'dropped':>7} "
          f"{'main CPU':>8} {'wrk CPU':>8} {'st/CPU-s':>11} {'others':>7}")


def cases(with_w4: bool) -> list[Case]:
    as_async = ("algo.aggregation=async",)
    grouped: list[Case] = [
        Case("grouped", "cartpole-batchsync", 1, ("algo.group_size=1",), "G=1"),
        Case("grouped", "cartpole-batchsync", 2, ("algo.group_size=1",), "G=1"),
        Case("grouped", "cartpole-batchsync", 2, ("algo.group_size=2",), "G=2")]
    if with_w4:
        grouped.append(Case("grouped", "cartpole-batchsync", 4, ("algo.group_size=2",), "G=2"))
    return [
        Case("gorila sync", "cartpole-gorila-sync", 1, as_async, "(async, 1 worker)"),
        Case("gorila sync", "cartpole-gorila-sync", 2),
        Case("gorila async", "cartpole-gorila-async", 1),
        Case("gorila async", "cartpole-gorila-async", 2),
        *grouped,
        Case("a2c", "cartpole-a2c", 1),
        Case("a2c", "cartpole-a2c", 2),
        Case("a3c hogwild", "cartpole-a3c", 1),
        Case("a3c hogwild", "cartpole-a3c", 2),
        Case("dper", "cartpole-dper", 2, ("replay.scope=local",), "(local replays)"),
        Case("dper", "cartpole-dper", 2, (), "(sharded, shared memory)")]


def measure(case: Case, warmup: float, seconds: float, seed: int) -> Measured:
    cfg = qfleet.load_config(case.preset, [
        f"actors.count={case.workers}", *case.overrides, f"seed={seed}",
        "runtime.backend=processes", "runtime.torch_threads=1", "log.progress=false",
        "log.tensorboard=false", "checkpoint.every=0"])
    runner = make_runner("processes", build_program(cfg))
    assert isinstance(runner, ProcessesGradientRunner)
    try:
        deadline = time.perf_counter() + START_TIMEOUT_S
        while runner.updates == 0:  # worker start and replay fill: not timed
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{case.label}: no update within {START_TIMEOUT_S:g} s")
            runner.step()
        t_end = time.perf_counter() + warmup
        while time.perf_counter() < t_end:
            runner.step()
        pids = [w.process.pid for w in runner.workers]
        cpu0 = sum(cpu_seconds(pid) for pid in pids if pid is not None)
        main0, busy0, version0 = time.process_time(), busy_cores_s(), runner.updates
        steps = applied = dropped = stale = 0
        t0 = time.perf_counter()
        while (now := time.perf_counter()) - t0 < seconds:
            report = runner.step()
            steps += report.env_steps
            applied += report.grads_applied
            dropped += report.grads_dropped
            stale += report.staleness_sum
            if report.actor_restarts:
                raise RuntimeError(f"{case.label}: a worker died during the measurement")
        dt = now - t0
        updates = runner.updates - version0
        main_cpu = (time.process_time() - main0) / dt
        workers_cpu = (sum(cpu_seconds(pid) for pid in pids if pid is not None) - cpu0) / dt
        others = (busy_cores_s() - busy0) / dt - main_cpu - workers_cpu
    finally:
        runner.close()
    return Measured(case, dt, updates, steps, applied, dropped, stale, main_cpu, workers_cpu,
                    others)


def scaling(results: list[Measured]) -> None:
    print("\nscaling W=2 / W=1 (goal >= 1.7x for gorila async and A3C; env steps/s >= 1.5x "
          "for gorila sync and A2C, grouped W=4 G=2 >= 1.3x):")
    by_scheme: dict[str, list[Measured]] = {}
    for m in results:
        by_scheme.setdefault(m.case.scheme, []).append(m)
    for ms in by_scheme.values():
        one = next((m for m in ms if m.case.workers == 1), None)
        if one is None:  # dper: compared with its local-replay run instead
            continue
        for m in ms:
            if m.case.workers == 1:
                continue
            up = m.updates_per_s / one.updates_per_s
            st = m.steps_per_s / one.steps_per_s
            verdict = _verdict(m.case, up, st)
            print(f"  {m.case.label:<18} / {one.case.label:<34} updates/s {up:5.2f}x, "
                  f"env steps/s {st:5.2f}x{verdict}")


def _verdict(case: Case, up: float, st: float) -> str:
    """The goals: async schemes scale both rates (issue 15); a sync step averages W
    gradients, so sync schemes scale env steps and keep updates/s (issue 19)."""
    if case.scheme in ("gorila async", "a3c hogwild") and case.workers == 2:
        return f"; goal {GOAL}x {'met' if min(up, st) >= GOAL else 'NOT met'}"
    if case.scheme in ("gorila sync", "a2c") and case.workers == 2:
        met = st >= SYNC_GOAL and up >= 1.0
        return f"; goal {SYNC_GOAL}x env steps, updates/s >= 1x: {'met' if met else 'NOT met'}"
    if case.label == "grouped W=4 G=2":
        return f"; goal {GROUPED_GOAL}x env steps {'met' if st >= GROUPED_GOAL else 'NOT met'}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured wall time each")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds after the first global update, before measuring")
    parser.add_argument("--no-w4", action="store_true", help="skip grouped W=4, G=2")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved rounds over all cases, pooled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", default=[], metavar="SCHEME",
                        help="run only this scheme (repeatable): " + ", ".join(
                            dict.fromkeys(c.scheme for c in cases(True))))
    args = parser.parse_args()
    selected = [c for c in cases(not args.no_w4) if not args.only or c.scheme in args.only]
    if not selected:
        parser.error(f"--only {args.only}: no such scheme")
    torch.set_num_threads(1)  # as the workers and runtime.torch_threads = 1 do

    print(f"processes backend, {args.seconds:g} s measured after {args.warmup:g} s warm-up "
          f"counted from the first global update (worker start and replay fill excluded), "
          f"{args.repeats} interleaved round(s); torch threads 1")
    print(f"this machine has {os.cpu_count()} CPUs; the workers step the global model "
          "themselves (sync: each its replica; async and grouped: a shared-memory model in "
          "turns; A3C: lock-free) and the main process only counts their reports, so its "
          "CPU share should stay small. 'gorila sync W=1' is the sync "
          "preset run async with 1 worker (sync needs W >= 2): the same single-worker "
          "computation. staleness = staleness_sum / grads_applied (global versions); "
          "'others' = cores busy with processes outside this benchmark.\n",
          flush=True)
    pooled: dict[Case, Measured] = {}
    for r in range(args.repeats):  # interleaved, so other users' jobs hit every case alike
        print(f"round {r + 1}/{args.repeats}\n{HEADER}", flush=True)
        for case in selected:
            m = measure(case, args.warmup, args.seconds, args.seed)
            pooled[case] = pooled[case].merge(m) if case in pooled else m
            print(m.row(), flush=True)
    if args.repeats > 1:
        print(f"\npooled over {args.repeats} rounds\n{HEADER}")
        for m in pooled.values():
            print(m.row())
    scaling(list(pooled.values()))
    shared_vs_local(list(pooled.values()))


def shared_vs_local(results: list[Measured]) -> None:
    dper = [m for m in results if m.case.scheme == "dper"]
    if len(dper) != 2:
        return
    local, shared = dper
    ratio = shared.steps_per_s / local.steps_per_s
    print(f"\ndper, sharded replay in shared memory / local replays: env steps/s {ratio:5.2f}x, "
          f"updates/s {shared.updates_per_s / local.updates_per_s:5.2f}x; goal {DPER_GOAL}x "
          f"env steps {'met' if ratio >= DPER_GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
