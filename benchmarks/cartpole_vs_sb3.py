"""qfleet DQN vs Stable-Baselines3 DQN on CartPole-v1, same zoo hyperparameters and seeds.

Both train 50k env steps with the rl-baselines3-zoo CartPole hyperparameters, evaluate
greedily on 20 episodes every 2,500 steps, and run with the same torch thread count.
Printed per library and seed: training env steps/s (eval time excluded), wall time to the
first eval >= 475 (with and without eval time), the final eval and whether every eval
after the first solve stayed >= 475; then the qfleet/SB3 ratios.

qfleet flushes denormal floats to zero where it trains (qfleet.compute); SB3 runs with
torch's defaults, as its users run it, unless --sb3-flush-denormal.

    python benchmarks/cartpole_vs_sb3.py [--seeds 0 1 2] [--steps 50000] [--threads 1]
        [--sb3-flush-denormal]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SOLVED = 475.0
ZOO: dict[str, Any] = {  # rl-baselines3-zoo hyperparams/dqn.yml, CartPole-v1
    "learning_rate": 2.3e-3, "batch_size": 64, "buffer_size": 100_000,
    "learning_starts": 1000, "gamma": 0.99, "target_update_interval": 10,
    "train_freq": 256, "gradient_steps": 128, "exploration_fraction": 0.16,
    "exploration_final_eps": 0.04,
}


@dataclass
class Run:
    lib: str
    seed: int
    evals: list[tuple[int, float, float, float]] = field(default_factory=list)
    # (env_steps, wall_s, eval_s so far, eval mean)
    wall_s: float = 0.0
    eval_s: float = 0.0
    steps: int = 0

    @property
    def steps_per_s(self) -> float:
        return self.steps / (self.wall_s - self.eval_s)

    def first_solve(self) -> tuple[float, float] | None:
        """(wall s, wall s without eval) at the first eval >= 475."""
        for _, wall, eval_s, mean in self.evals:
            if mean >= SOLVED:
                return wall, wall - eval_s
        return None

    def held(self) -> bool:
        solved = [m >= SOLVED for *_, m in self.evals]
        return True in solved and all(solved[solved.index(True):])


def run_qfleet(seed: int, steps: int, eval_every: int) -> Run:
    import qfleet

    cfg = qfleet.load_config("cartpole-dqn", [
        f"seed={seed}", f"train.total_env_steps={steps}", f"train.eval_every={eval_every}",
        "train.target_return=1e9", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every=0", "runtime.torch_threads=0",
        "learner.lr_schedule=constant",  # the zoo's rate (the preset's decays to 0)
        "algo.double=false"])  # SB3's DQN is the vanilla (non-double) one
    run_dir = f"/tmp/qfleet-bench/sb3cmp-{seed}-{time.time_ns()}"
    result = qfleet.train(cfg, run_dir)
    run = Run("qfleet", seed, wall_s=result.wall_s, steps=result.env_steps)
    with open(f"{run_dir}/metrics.jsonl") as fh:
        for rec in map(json.loads, fh):
            if rec["event"] == "eval":
                run.evals.append((rec["env_steps"], rec["wall_s"], rec["eval_s"],
                                  rec["eval_return_mean"]))
    run.eval_s = run.evals[-1][2]
    return run


def run_sb3(seed: int, steps: int, eval_every: int, flush_denormal: bool = False) -> Run:
    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    run = Run("sb3", seed)
    eval_env = gym.make("CartPole-v1")

    class Evaluate(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.t0 = time.perf_counter()

        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0:
                t = time.perf_counter()
                mean, _ = evaluate_policy(self.model, eval_env, n_eval_episodes=20,
                                          deterministic=True)
                run.eval_s += time.perf_counter() - t
                run.evals.append((self.num_timesteps, time.perf_counter() - self.t0,
                                  run.eval_s, float(np.mean(mean))))
            return True

    # qfleet flushes denormal floats while it trains (qfleet.compute) and puts the flag
    # back after; SB3 runs as its users run it unless --sb3-flush-denormal
    torch.set_flush_denormal(flush_denormal)
    model = DQN("MlpPolicy", "CartPole-v1", seed=seed, policy_kwargs={"net_arch": [256, 256]},
                verbose=0, device="cpu", **ZOO)
    callback = Evaluate()
    model.learn(total_timesteps=steps, callback=callback)
    run.wall_s = time.perf_counter() - callback.t0
    run.steps = steps
    return run


def describe(run: Run) -> str:
    solve = run.first_solve()
    solve_txt = (f"solved at {solve[0]:6.1f} s ({solve[1]:6.1f} s without eval)" if solve
                 else "never solved")
    return (f"{run.lib:6} seed {run.seed}: {run.steps_per_s:6.0f} env steps/s, {solve_txt}, "
            f"final eval {run.evals[-1][3]:5.1f}, held >= 475 to the end: {run.held()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=2_500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both")
    parser.add_argument("--sb3-flush-denormal", action="store_true",
                        help="SB3 with denormals flushed too, as qfleet computes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, list[Run]] = {"qfleet": [], "sb3": []}
    for seed in args.seeds:  # interleaved, so machine noise hits both alike
        sb3 = functools.partial(run_sb3, flush_denormal=args.sb3_flush_denormal)
        for lib, fn in (("sb3", sb3), ("qfleet", run_qfleet)):
            run = fn(seed, args.steps, args.eval_every)
            runs[lib].append(run)
            print(describe(run), flush=True)
    summarize(runs)


def summarize(runs: dict[str, list[Run]]) -> None:
    rate = {lib: statistics.mean(r.steps_per_s for r in rs) for lib, rs in runs.items()}
    print(f"\nenv steps/s (eval excluded): qfleet {rate['qfleet']:.0f}, sb3 {rate['sb3']:.0f}, "
          f"ratio {rate['qfleet'] / rate['sb3']:.2f}x (goal >= 1.5x)")
    for key, idx in (("with eval", 0), ("without eval", 1)):
        solve = {lib: [s[idx] for r in rs if (s := r.first_solve())] for lib, rs in runs.items()}
        counts = {lib: f"{len(v)}/{len(runs[lib])}" for lib, v in solve.items()}
        if solve["qfleet"] and solve["sb3"]:
            q, sb = statistics.mean(solve["qfleet"]), statistics.mean(solve["sb3"])
            print(f"time to first eval >= 475 ({key}): qfleet {q:.1f} s ({counts['qfleet']} "
                  f"seeds), sb3 {sb:.1f} s ({counts['sb3']} seeds), ratio {q / sb:.2f} "
                  f"(goal <= 0.7), means over the seeds that solved")
        else:
            print(f"time to solve ({key}): solved seeds {counts}")
    for lib, rs in runs.items():
        print(f"{lib}: held >= 475 after first solve on {sum(r.held() for r in rs)}/{len(rs)} "
              "seeds")


if __name__ == "__main__":
    main()
