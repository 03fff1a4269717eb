"""qfleet A2C vs Stable-Baselines3 A2C on CartPole-v1, zoo hyperparameters, same seeds.

Both libraries train the same single-process shape: 8 envs, 5-step rollouts, one update
per 40 env steps, with the rl-baselines3-zoo CartPole-v1 A2C hyperparameters (gamma 0.99,
RMSprop lr 7e-4 alpha 0.99 eps 1e-5, ent_coef 0, vf_coef 0.5, max_grad_norm 0.5, no
advantage normalization, 64x64 MLP), torch threads 1, a budget of 500k env steps. qfleet
runs the ``cartpole-a2c`` preset with ``runtime.backend = "inline"``, ``actors.count = 1``,
``env.num_envs = 8``. The networks are the same shape: separate 64x64 Tanh policy and
value MLPs with orthogonal init (SB3's MlpPolicy default; the preset's ``net.activation``,
``net.shared_torso = false``, ``net.init = "orthogonal"``). ``--sb3-activation relu``
gives SB3 ReLU instead, to see the activation's share of a difference.

Evaluation is the same procedure for both: every 10k env steps, after that step's update,
``qfleet.evaluate.evaluate`` runs 20 greedy episodes (argmax of the policy logits; SB3's
policy is wrapped as a module returning its logits) on the same eval seeds. A run stops at
its first eval >= 475. Printed per seed and as means: env steps and wall time to solve
(with and without eval time), env steps/s (eval excluded), and the qfleet/SB3 time ratio
(goal <= 0.7).

    python benchmarks/cartpole_a2c_vs_sb3.py [--seeds 0 1 2] [--steps 500000] [--threads 1]
        [--sb3-activation tanh|relu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import qfleet
from qfleet.evaluate import evaluate

SOLVED = 475.0
EVAL_EPISODES = 20
N_ENVS = 8
ZOO: dict[str, Any] = {  # rl-baselines3-zoo hyperparams/a2c.yml CartPole-v1 + SB3 defaults
    "n_steps": 5, "gamma": 0.99, "learning_rate": 7e-4, "ent_coef": 0.0, "vf_coef": 0.5,
    "max_grad_norm": 0.5, "gae_lambda": 1.0, "use_rms_prop": True, "rms_prop_eps": 1e-5,
    "normalize_advantage": False,
}


@dataclass
class Run:
    lib: str
    seed: int
    evals: list[tuple[int, float, float, float]] = field(default_factory=list)
    # (env_steps, wall_s, eval_s so far, eval mean), wall_s taken after the eval

    @property
    def steps_per_s(self) -> float:
        steps, wall, eval_s, _ = self.evals[-1]
        return steps / (wall - eval_s)

    def first_solve(self) -> tuple[int, float, float] | None:
        """(env steps, wall s, wall s without eval) at the first eval >= 475."""
        for steps, wall, eval_s, mean in self.evals:
            if mean >= SOLVED:
                return steps, wall, wall - eval_s
        return None


def qfleet_config(seed: int, steps: int, eval_every: int) -> qfleet.Config:
    return qfleet.load_config("cartpole-a2c", [
        f"seed={seed}", f"train.total_env_steps={steps}", f"train.eval_every={eval_every}",
        f"train.eval_episodes={EVAL_EPISODES}", f"train.target_return={SOLVED}",
        "runtime.backend=inline", "actors.count=1", f"env.num_envs={N_ENVS}",
        "runtime.torch_threads=0",  # keep the thread count main() set for both libraries
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"])


def run_qfleet(seed: int, steps: int, eval_every: int, run_root: str) -> Run:
    cfg = qfleet_config(seed, steps, eval_every)
    run_dir = f"{run_root}/qfleet-a2c-{seed}-{time.time_ns()}"
    qfleet.train(cfg, run_dir)
    run = Run("qfleet", seed)
    with open(f"{run_dir}/metrics.jsonl") as fh:
        for rec in map(json.loads, fh):
            if rec["event"] == "eval":
                run.evals.append((rec["env_steps"], rec["wall_s"], rec["eval_s"],
                                  rec["eval_return_mean"]))
    return run


class SB3Logits(nn.Module):
    """An SB3 actor-critic policy as a module whose forward returns the action logits, so
    qfleet's greedy evaluation (argmax over dim 1) runs it exactly as it runs qfleet's."""

    def __init__(self, policy: Any) -> None:  # an SB3 ActorCriticPolicy (an nn.Module)
        super().__init__()
        self.policy = policy

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.policy.get_distribution(obs_BO).distribution.logits
        return logits


def run_sb3(seed: int, steps: int, eval_every: int, activation: str = "tanh") -> Run:
    from stable_baselines3 import A2C
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    env_cfg = qfleet_config(seed, steps, eval_every).env
    run = Run("sb3", seed)

    class Evaluate(BaseCallback):
        """Evaluates at the start of the first rollout at or past each 10k steps, i.e.
        after the update on the rollout that reached them (as qfleet evaluates after the
        round); stops training at the first solve."""

        def __init__(self) -> None:
            super().__init__()
            self.t0, self.eval_s, self.next_eval, self.solved = 0.0, 0.0, eval_every, False

        def _on_training_start(self) -> None:
            self.t0 = time.perf_counter()

        def _eval(self) -> None:
            t = time.perf_counter()
            mean = evaluate(SB3Logits(self.model.policy), env_cfg, EVAL_EPISODES, seed).mean
            self.eval_s += time.perf_counter() - t
            run.evals.append((self.num_timesteps, time.perf_counter() - self.t0, self.eval_s,
                              mean))
            self.next_eval = self.num_timesteps + eval_every
            self.solved = mean >= SOLVED

        def _on_rollout_start(self) -> None:
            if self.num_timesteps >= self.next_eval:
                self._eval()

        def _on_step(self) -> bool:
            return not self.solved

        def _on_training_end(self) -> None:
            if not self.solved and (not run.evals or run.evals[-1][0] != self.num_timesteps):
                self._eval()  # the budget's end, as qfleet's final eval

    env = make_vec_env("CartPole-v1", n_envs=N_ENVS, seed=seed)
    policy_kwargs = {"net_arch": [64, 64],
                     "activation_fn": {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]}
    model = A2C("MlpPolicy", env, seed=seed, policy_kwargs=policy_kwargs, verbose=0,
                device="cpu", **ZOO)
    model.learn(total_timesteps=steps, callback=Evaluate())
    env.close()
    return run


def describe(run: Run) -> str:
    solve = run.first_solve()
    solve_txt = (f"solved at {solve[0]:7d} steps, {solve[1]:6.1f} s ({solve[2]:6.1f} s "
                 "without eval)" if solve else f"not solved in {run.evals[-1][0]} steps "
                 f"(best eval {max(e[3] for e in run.evals):.1f})")
    return f"{run.lib:6} seed {run.seed}: {run.steps_per_s:6.0f} env steps/s, {solve_txt}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both")
    parser.add_argument("--sb3-activation", choices=("tanh", "relu"), default="tanh",
                        help="SB3's MlpPolicy activation (tanh: its default, the zoo's)")
    parser.add_argument("--run-root", default="/tmp/qfleet-bench",
                        help="where qfleet's run directories go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CartPole-v1 A2C, zoo hyperparameters, {N_ENVS} envs x 5-step rollouts, budget "
          f"{args.steps} env steps, greedy eval of {EVAL_EPISODES} episodes every "
          f"{args.eval_every} steps (qfleet.evaluate for both), torch threads {args.threads}; "
          f"networks: qfleet shared 64x64 ReLU torso + 2 heads, SB3 separate 64x64 "
          f"{args.sb3_activation} policy and value MLPs",
          flush=True)
    runs: dict[str, list[Run]] = {"qfleet": [], "sb3": []}
    for seed in args.seeds:  # interleaved, so machine noise hits both alike
        for lib in ("sb3", "qfleet"):
            run = (run_sb3(seed, args.steps, args.eval_every, args.sb3_activation)
                   if lib == "sb3" else
                   run_qfleet(seed, args.steps, args.eval_every, args.run_root))
            runs[lib].append(run)
            print(describe(run), flush=True)
    summarize(runs)


def summarize(runs: dict[str, list[Run]]) -> None:
    rate = {lib: statistics.mean(r.steps_per_s for r in rs) for lib, rs in runs.items()}
    print(f"\nenv steps/s (eval excluded), mean over seeds: qfleet {rate['qfleet']:.0f}, "
          f"sb3 {rate['sb3']:.0f}, ratio {rate['qfleet'] / rate['sb3']:.2f}x")
    print("\nper seed, qfleet / sb3:")
    both: list[tuple[tuple[int, float, float], tuple[int, float, float]]] = []
    for q, s in zip(runs["qfleet"], runs["sb3"], strict=True):
        qs, ss = q.first_solve(), s.first_solve()
        if qs and ss:
            both.append((qs, ss))
            print(f"  seed {q.seed}: steps {qs[0]} / {ss[0]} = {qs[0] / ss[0]:.2f}, time "
                  f"{qs[1]:.1f} / {ss[1]:.1f} s = {qs[1] / ss[1]:.2f} with eval, "
                  f"{qs[2]:.1f} / {ss[2]:.1f} s = {qs[2] / ss[2]:.2f} without eval")
        else:
            print(f"  seed {q.seed}: solved qfleet {bool(qs)}, sb3 {bool(ss)}: no ratio")
    solved = {lib: sum(r.first_solve() is not None for r in rs) for lib, rs in runs.items()}
    print(f"solved: qfleet {solved['qfleet']}/{len(runs['qfleet'])}, "
          f"sb3 {solved['sb3']}/{len(runs['sb3'])} seeds")
    if not both:
        return
    print(f"\nmeans over the {len(both)} seed(s) both solved:")
    for key, idx in (("env steps to solve", 0), ("time to solve with eval", 1),
                     ("time to solve without eval", 2)):
        q_mean = statistics.mean(p[0][idx] for p in both)
        s_mean = statistics.mean(p[1][idx] for p in both)
        per_seed = statistics.mean(p[0][idx] / p[1][idx] for p in both)
        goal = " (goal <= 0.7)" if idx else ""
        print(f"  {key:<27} qfleet {q_mean:9.1f}, sb3 {s_mean:9.1f}; ratio of means "
              f"{q_mean / s_mean:.2f}, "
              f"mean of per-seed ratios {per_seed:.2f}{goal}")


if __name__ == "__main__":
    main()
