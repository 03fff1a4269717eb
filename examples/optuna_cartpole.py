"""Tune cartpole-dqn with Optuna, pruning trials through qfleet's on_eval callback.

Every greedy evaluation of a trial's run is reported to Optuna; a trial whose eval return
falls below the median of the earlier trials at the same env step is stopped there (the
median pruning rl-baselines3-zoo tunes with). A stopped run still finishes cleanly: final
eval, checkpoint and result.json in its run directory.

    pip install 'qfleet[tune]'
    python examples/optuna_cartpole.py --trials 20 --steps 30000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

import qfleet


class PruneOnEval(qfleet.Callback):
    """Report each eval to the trial; stop the run once Optuna says to prune it."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.pruned = trial, False

    def on_eval(self, record: dict[str, Any]) -> bool:
        self.trial.report(record["eval_return_mean"], step=record["env_steps"])
        self.pruned = self.trial.should_prune()
        return self.pruned  # True stops the run after this eval


def objective(trial: optuna.Trial, steps: int, run_root: Path,
              overrides: Sequence[str]) -> float:
    lr = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
    target_every = trial.suggest_categorical("target_update_every", [32, 128, 512])
    cfg = qfleet.load_config("cartpole-dqn", [
        f"learner.lr={lr}", f"learner.target_update_every={target_every}",
        f"train.total_env_steps={steps}", "log.progress=false", *overrides])
    prune = PruneOnEval(trial)
    result = qfleet.train(cfg, run_root / f"trial-{trial.number}", callbacks=[prune])
    if prune.pruned:
        raise optuna.TrialPruned(f"eval return {result.eval_return_mean:.1f} at "
                                 f"{result.env_steps} env steps")
    return result.eval_return_mean


def make_study(seed: int = 0, startup_trials: int = 5) -> optuna.Study:
    """An in-memory study: seeded TPE sampling, median pruning after ``startup_trials``."""
    return optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0))


def tune(study: optuna.Study, trials: int, steps: int, run_root: Path,
         overrides: Sequence[str] = ()) -> optuna.Study:
    study.optimize(lambda trial: objective(trial, steps, run_root, overrides), n_trials=trials)
    return study


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30_000, help="env steps per trial")
    parser.add_argument("--runs", default="runs/optuna", help="one run directory per trial")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of every trial's config")
    args = parser.parse_args(argv)
    study = tune(make_study(), args.trials, args.steps, Path(args.runs), args.set)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    print(f"best eval return {study.best_value:.1f} with {study.best_params} "
          f"({len(study.trials)} trials, {pruned} pruned)")


if __name__ == "__main__":
    main()
