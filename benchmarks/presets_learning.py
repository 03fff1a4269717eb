"""Train presets to their published thresholds and report greedy evaluation over 20 episodes.

The CartPole presets are checked in the test suite's slow lane; the longer ones live here.
For each preset and seed it prints the final greedy eval, the env steps and wall time at
which an eval first reached the threshold, and whether it passed. Reference: the
threshold itself (Acrobot-v1 >= -100, LunarLander-v3 >= 200, MountainCar-v0 >= -110), as
the issues state them; with ``--sb3``, also Stable-Baselines3's DQN on the same env, seeds
and hyperparameters (DQN presets: the zoo's, which these presets copy), evaluated alike.

    python benchmarks/presets_learning.py [--presets acrobot-dqn lunarlander-dqn] [--seeds 0]
        [--sb3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import qfleet

THRESHOLDS = {"Acrobot-v1": -100.0, "LunarLander-v3": 200.0, "CartPole-v1": 475.0,
              "MountainCar-v0": -110.0}


def first_reaching(run_dir: Path, threshold: float) -> tuple[int, float] | None:
    with (run_dir / "metrics.jsonl").open() as fh:
        for rec in map(json.loads, fh):
            if rec["event"] == "eval" and rec["eval_return_mean"] >= threshold:
                return rec["env_steps"], rec["wall_s"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["acrobot-dqn", "lunarlander-dqn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="/tmp/qfleet-bench/presets")
    parser.add_argument("--sb3", action="store_true",
                        help="also train SB3's DQN with each DQN preset's hyperparameters")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            cfg = qfleet.load_config(preset, [f"seed={seed}", "log.progress=false"])
            threshold = THRESHOLDS[cfg.env.id]
            run_dir = Path(args.out) / f"{preset}-{seed}-{time.strftime('%H%M%S')}"
            result = qfleet.train(cfg, run_dir)
            hit = first_reaching(run_dir, threshold)
            when = f"first >= {threshold:g} at {hit[0]:,} steps / {hit[1]:.0f} s" if hit \
                else f"never >= {threshold:g}"
            ok = result.eval_return_mean >= threshold
            rows.append(ok)
            print(f"{preset:<18} seed {seed}: final eval {result.eval_return_mean:8.1f} ± "
                  f"{result.eval_return_std:5.1f} after {result.env_steps:,} steps, "
                  f"{result.wall_s:.0f} s; {when}; {'PASS' if ok else 'FAIL'}", flush=True)
            if args.sb3 and cfg.algo.name == "dqn":
                print(f"{'  sb3 (reference)':<18} seed {seed}: {run_sb3(cfg, threshold)}",
                      flush=True)
    print(f"\n{sum(rows)}/{len(rows)} runs at or above their threshold")


def run_sb3(cfg: qfleet.Config, threshold: float) -> str:
    """SB3's DQN on the preset's env and hyperparameters; greedy evals over as many
    episodes at the preset's cadence. Returns the same line's summary."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    lr, tr, act = cfg.learner, cfg.train, cfg.actors
    evals: list[tuple[int, float]] = []

    class Evals(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % tr.eval_every == 0:
                mean, _ = evaluate_policy(self.model, gym.make(cfg.env.id),
                                          n_eval_episodes=tr.eval_episodes, deterministic=True)
                evals.append((self.num_timesteps, float(np.mean(mean))))
            return True

    model = DQN("MlpPolicy", cfg.env.id, seed=cfg.seed, device="cpu",
                policy_kwargs={"net_arch": list(cfg.net.hidden)}, learning_rate=lr.lr,
                batch_size=lr.batch_size, buffer_size=cfg.replay.capacity,
                learning_starts=lr.learning_starts, gamma=cfg.algo.gamma,
                train_freq=lr.train_every, gradient_steps=lr.updates_per_round,
                # the preset counts updates between target copies, SB3 env steps
                target_update_interval=lr.target_update_every * lr.train_every
                // lr.updates_per_round, exploration_fraction=act.eps_fraction,
                exploration_initial_eps=act.eps_start, exploration_final_eps=act.eps_end)
    t0 = time.perf_counter()
    model.learn(tr.total_env_steps, callback=Evals())
    hit = next(((step, v) for step, v in evals if v >= threshold), None)
    when = f"first >= {threshold:g} at {hit[0]:,} steps" if hit else f"never >= {threshold:g}"
    return (f"final eval {evals[-1][1]:8.1f} after {tr.total_env_steps:,} steps, "
            f"{time.perf_counter() - t0:.0f} s; {when}; evals {[round(v) for _, v in evals]}")


if __name__ == "__main__":
    main()
