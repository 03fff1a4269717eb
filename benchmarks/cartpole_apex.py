"""Wall time to solve CartPole-v1: Ape-X (2 actor processes) vs DQN inline vs SB3 DQN.

Per seed, interleaved so machine noise hits all three alike: qfleet ``cartpole-apex``
(processes backend, 2 actor processes), qfleet ``cartpole-dqn`` (inline) and
Stable-Baselines3 DQN with the rl-baselines3-zoo hyperparameters (from
cartpole_vs_sb3.py). Every run evaluates greedily on 20 episodes every --eval-every env
steps; solve time is the wall time at the first eval >= 475, eval time included. The qfleet
runs stop there (train.target_return = 475) and their time also counts building the runner
(forking the actors); SB3 trains its 50k steps and is timed from the start of ``learn``.
Printed per run, then the means and the ratios (goal: Ape-X fastest).

``--lunarlander`` instead reports the ``lunarlander-apex`` preset's wall time to the first
greedy eval >= 200 on LunarLander-v3 (the preset's own eval cadence unless --eval-every).

    python benchmarks/cartpole_apex.py [--seeds 0 1 2] [--eval-every 2500] [--lunarlander]
        [--apex-set learner.updates_per_round=32 ...]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import qfleet
from qfleet.experiment import Experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The SB3 runner of cartpole_vs_sb3.py (zoo hyperparameters, its eval callback); imported by
# name so this file's type check does not take on that file's.
run_sb3 = importlib.import_module("cartpole_vs_sb3").run_sb3

OUT = Path("/tmp/qfleet-bench/cartpole-apex")
CARTPOLE_RUNS = ("cartpole-apex", "cartpole-dqn", "sb3-dqn")


@dataclass
class Solve:
    name: str
    seed: int
    wall_s: float | None  # to the first eval >= target, None if never
    env_steps: int | None
    final: float
    setup_s: float = 0.0  # building the runner, before the run's own clock starts

    def line(self, target: float) -> str:
        if self.wall_s is None:
            return (f"{self.name:<14} seed {self.seed}: never reached {target:g} "
                    f"(final eval {self.final:.1f})")
        steps = f" after {self.env_steps:,} env steps" if self.env_steps is not None else ""
        setup = f" (incl. {self.setup_s:.1f} s setup)" if self.setup_s else ""
        return (f"{self.name:<14} seed {self.seed}: first eval >= {target:g} at "
                f"{self.wall_s:6.1f} s{setup}{steps}; final eval {self.final:.1f}")


def run_qfleet(preset: str, seed: int, eval_every: int | None,
               extra: list[str] | None = None) -> Solve:
    overrides = [f"seed={seed}", "log.progress=false", "log.tensorboard=false",
                 "checkpoint.every=0", *(extra or [])]
    if eval_every:
        overrides.append(f"train.eval_every={eval_every}")
    cfg = qfleet.load_config(preset, overrides)
    assert cfg.train.target_return is not None
    run_dir = OUT / f"{preset}-{seed}-{time.time_ns()}"
    t0 = time.perf_counter()
    experiment = Experiment(cfg, run_dir)  # builds the runner: for Ape-X, forks the actors
    setup = time.perf_counter() - t0
    result = experiment.run()
    wall = None if result.solved_at_wall_s is None else setup + result.solved_at_wall_s
    return Solve(preset, seed, wall, result.solved_at_env_steps, result.eval_return_mean,
                 setup)


def run_sb3_solve(seed: int, eval_every: int) -> Solve:
    run = run_sb3(seed, 50_000, eval_every)
    solve = run.first_solve()
    steps = next((s for s, _, _, m in run.evals if m >= 475.0), None)
    return Solve("sb3-dqn", seed, solve[0] if solve else None, steps, run.evals[-1][3])


def summarize(runs: dict[str, list[Solve]], target: float) -> None:
    means: dict[str, float] = {}
    print()
    for name, rs in runs.items():
        solved = [r.wall_s for r in rs if r.wall_s is not None]
        if solved:
            means[name] = statistics.mean(solved)
            spread = f" (min {min(solved):.1f}, max {max(solved):.1f})" if len(solved) > 1 else ""
            print(f"{name:<14} mean time to eval >= {target:g}: {means[name]:6.1f} s over "
                  f"{len(solved)}/{len(rs)} seeds solved{spread}")
        else:
            print(f"{name:<14} solved 0/{len(rs)} seeds")
    apex = means.get("cartpole-apex")
    if apex is None:
        return
    for other in ("cartpole-dqn", "sb3-dqn"):
        if other in means:
            print(f"time ratio cartpole-apex / {other}: {apex / means[other]:.2f} "
                  f"(speed-up {means[other] / apex:.2f}x; means over solved seeds)")
    fastest = min(means, key=means.__getitem__)
    print(f"fastest: {fastest} (goal: cartpole-apex)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=None,
                        help="env steps between evals for every run (default 2500 on "
                        "CartPole, the preset's own with --lunarlander)")
    parser.add_argument("--apex-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the Ape-X runs only, e.g. "
                        "learner.updates_per_round=32 (repeatable)")
    parser.add_argument("--runs", nargs="+", default=list(CARTPOLE_RUNS),
                        choices=CARTPOLE_RUNS, help="which of the three to run")
    parser.add_argument("--lunarlander", action="store_true",
                        help="report lunarlander-apex's time to eval >= 200 instead")
    args = parser.parse_args()
    torch.set_num_threads(1)  # runtime.torch_threads = 1 for qfleet; the same for SB3
    if args.lunarlander:
        runs: dict[str, list[Solve]] = {"lunarlander-apex": []}
        for seed in args.seeds:
            run = run_qfleet("lunarlander-apex", seed, args.eval_every, args.apex_set)
            runs["lunarlander-apex"].append(run)
            print(run.line(200.0), flush=True)
        summarize(runs, 200.0)
        return
    eval_every = args.eval_every or 2500
    print(f"CartPole-v1, eval every {eval_every} env steps over 20 episodes, "
          f"seeds {args.seeds}" + (f"; Ape-X overrides {args.apex_set}" if args.apex_set
                                   else ""), flush=True)
    runs = {name: [] for name in CARTPOLE_RUNS if name in args.runs}
    for seed in args.seeds:  # interleaved, so machine noise hits all three alike
        for name in runs:
            run = (run_sb3_solve(seed, eval_every) if name == "sb3-dqn"
                   else run_qfleet(name, seed, eval_every,
                                   args.apex_set if name == "cartpole-apex" else None))
            runs[name].append(run)
            print(run.line(475.0), flush=True)
    summarize(runs, 475.0)


if __name__ == "__main__":
    main()
