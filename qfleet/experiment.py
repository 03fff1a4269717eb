"""run_experiment: the training loop around any backend runner.

The runner moves data between roles; this loop only counts, logs, evaluates and
checkpoints. It reads top to bottom: build, (restore), step until done, finish.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import tomllib
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from qfleet import checkpoint
from qfleet.algos import build_program
from qfleet.config import Config, ConfigError, to_toml
from qfleet.evaluate import evaluate
from qfleet.metrics import MetricsWriter
from qfleet.progress import ProgressLine
from qfleet.runtime import RoundReport, WorkerError, make_runner, ray_options


@dataclass
class Result:
    eval_return_mean: float
    eval_return_std: float
    eval_episodes: int
    env_steps: int
    updates: int
    wall_s: float
    env_steps_per_s: float
    best_eval_return_mean: float
    solved_at_env_steps: int | None  # first eval >= train.target_return, if one is set
    solved_at_wall_s: float | None
    run_dir: str


class Interrupted(KeyboardInterrupt):
    """Raised after Ctrl-C / SIGTERM once a checkpoint has been written."""

    def __init__(self, signum: int, ckpt: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved to {ckpt}")
        self.exit_code = 128 + signum
        self.checkpoint = ckpt


class _StopFlag:
    """First Ctrl-C/SIGTERM asks the loop to stop after the current round (a safe point to
    checkpoint); a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def summarize_window(win: list[RoundReport], dt: float, num_actors: int,
                     batch_size: int) -> dict[str, Any]:
    """Rates and means over the rounds since the last log line."""
    steps, updates = sum(r.env_steps for r in win), sum(r.updates for r in win)
    losses, applied = sum(r.loss_count for r in win), sum(r.grads_applied for r in win)
    epsilons = [r.epsilon for r in win if r.epsilon is not None]
    stats: dict[str, Any] = {
        "env_steps_per_s": steps / dt, "updates_per_s": updates / dt,
        "episodes": sum(len(r.episode_returns) for r in win),
        "replay_ratio": losses * batch_size / steps if steps else None,  # samples / insert
        "epsilon": epsilons[-1] if epsilons else None,
        "loss": sum(r.loss_sum for r in win) / losses if losses else None,
        "q_mean": sum(r.q_sum for r in win) / losses if losses else None,
        # learner version minus the version that chose a chunk's actions, per chunk
        "param_lag": sum(r.param_lag_sum for r in win) / max(1, sum(r.chunks for r in win)),
    }
    if applied or any(r.grads_dropped for r in win):  # gradient schemes
        stats["staleness"] = sum(r.staleness_sum for r in win) / applied if applied else None
        stats["grads_dropped"] = sum(r.grads_dropped for r in win)
    if num_actors > 1:
        by_actor = [sum(r.steps_by_actor.get(i, 0) for r in win) for i in range(num_actors)]
        stats["env_steps_per_s_by_actor"] = [n / dt for n in by_actor]
    return stats


def _install_handlers(stop: _StopFlag) -> dict[int, Any]:
    """Route SIGINT/SIGTERM to ``stop``; only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}


def default_run_dir(cfg: Config, name: str | None = None) -> Path:
    stem = name or f"{cfg.env.id.split('/')[-1].split(':')[-1].lower()}-{cfg.algo.name}"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class Experiment:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        if cfg.runtime.torch_threads:
            torch.set_num_threads(cfg.runtime.torch_threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.runner = make_runner(cfg.runtime.backend, build_program(cfg), ray_options(cfg))
        self.wall_offset = 0.0
        self.episodes: deque[float] = deque(maxlen=20)
        self.episodes_by_actor: dict[int, deque[float]] = {}
        self.window: list[RoundReport] = []
        self.last_eval: tuple[int, float, float] | None = None  # (env_steps, mean, std)
        self.best_eval = -float("inf")
        self.eval_s = 0.0  # wall time spent in greedy evals, so rates can exclude it
        self.actor_restarts = 0
        self.solved: tuple[int, float] | None = None
        t = cfg.train
        self.next_log, self.next_eval, self.next_ckpt = cfg.log.every, t.eval_every, \
            cfg.checkpoint.every

    # ------------------------------------------------------------ state

    def wall_s(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    def save_checkpoint(self) -> Path:
        tensors, meta, replay = self.runner.state(self.cfg.checkpoint.replay)
        meta |= {"config": to_toml(self.cfg), "wall_s": self.wall_s(),
                 "best_eval": self.best_eval, "solved": self.solved, "eval_s": self.eval_s,
                 "actor_restarts": self.actor_restarts,
                 "recent_returns": list(self.episodes),
                 "next": [self.next_log, self.next_eval, self.next_ckpt]}
        return checkpoint.save(self.run_dir / "checkpoints", self.runner.env_steps, tensors,
                               meta, replay)

    def restore(self, ckpt: Path) -> None:
        tensors, meta, replay = checkpoint.load(ckpt)
        self.runner.restore(tensors, meta, replay)
        self.wall_offset = meta["wall_s"]
        self.best_eval, self.solved = meta["best_eval"], meta["solved"]
        self.eval_s, self.actor_restarts = meta["eval_s"], meta["actor_restarts"]
        self.episodes.extend(meta["recent_returns"])
        self.next_log, self.next_eval, self.next_ckpt = meta["next"]

    # ------------------------------------------------------------ loop

    def run(self) -> Result:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.t_window = self.t0
        # Written only now that a resume's restore succeeded: a failed one keeps the old file.
        (self.run_dir / "config.toml").write_text(to_toml(cfg))
        self.metrics = MetricsWriter(self.run_dir, cfg.log.tensorboard)
        self.progress = ProgressLine(cfg.train.total_env_steps, cfg.log.progress,
                                     self.runner.env_steps)
        self.progress.print(self.runner.describe())
        stop = _StopFlag()
        handlers = _install_handlers(stop)
        try:
            while self.runner.env_steps < cfg.train.total_env_steps and not self._target_hit():
                self._after_round(self.runner.step())
                if stop.signum is not None:
                    self.runner.freeze()
                    raise Interrupted(stop.signum, self.save_checkpoint())
            return self._finish()
        except WorkerError as err:  # the run cannot go on: say where it can resume from
            raise WorkerError(f"{err}\n{self._resume_hint()}") from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self.progress.close()
            self.metrics.close()
            self.runner.close()

    def _resume_hint(self) -> str:
        try:
            ckpt = checkpoint.find(self.run_dir)
        except checkpoint.CheckpointError:
            return "no checkpoint was written yet"
        return f"last checkpoint: {ckpt} (continue with `qfleet resume {self.run_dir}`)"

    def _target_hit(self) -> bool:
        return self.cfg.train.target_return is not None and self.solved is not None

    def _after_round(self, report: RoundReport) -> None:
        self.window.append(report)
        for note in report.notes:
            self.progress.print(note)
        self.episodes.extend(report.episode_returns)
        for actor, returns in report.returns_by_actor.items():
            self.episodes_by_actor.setdefault(actor, deque(maxlen=20)).extend(returns)
        steps = self.runner.env_steps
        if steps >= self.next_log:
            self._log_train()
            self.next_log = steps + self.cfg.log.every
        if self.cfg.train.eval_every and steps >= self.next_eval:
            self._eval()
            self.next_eval = steps + self.cfg.train.eval_every
        if self.cfg.checkpoint.every and steps >= self.next_ckpt:
            self.save_checkpoint()
            self.next_ckpt = steps + self.cfg.checkpoint.every

    def _log_train(self) -> None:
        now = time.perf_counter()
        win, self.window = self.window, []
        dt = max(now - self.t_window, 1e-9)
        self.t_window = now
        self.actor_restarts += sum(r.actor_restarts for r in win)
        record: dict[str, Any] = {
            "env_steps": self.runner.env_steps, "wall_s": round(self.wall_s(), 3),
            "updates": self.runner.updates,
            "return_mean": float(np.mean(self.episodes)) if self.episodes else None,
            **summarize_window(win, dt, self.runner.program.num_actors,
                               self.runner.program.batch_size),
            "replay_size": self.runner.replay_size, "actor_restarts": self.actor_restarts}
        if self.runner.program.num_actors > 1:  # Ape-X actors explore differently: show each
            record["return_mean_by_actor"] = [
                float(np.mean(d)) if (d := self.episodes_by_actor.get(i)) else None
                for i in range(self.runner.program.num_actors)]
        self.metrics.write("train", record)
        last = self.last_eval[1] if self.last_eval else None
        self.progress.update(record | {"eval_return_mean": last})

    def _eval(self) -> tuple[float, float]:
        steps = self.runner.env_steps
        if self.last_eval is not None and self.last_eval[0] == steps:
            return self.last_eval[1], self.last_eval[2]
        t0 = time.perf_counter()
        res = evaluate(self.runner.policy_net, self.cfg.env, self.cfg.train.eval_episodes,
                       self.cfg.seed)
        self.eval_s += time.perf_counter() - t0
        self.last_eval = (steps, res.mean, res.std)
        self.best_eval = max(self.best_eval, res.mean)
        target = self.cfg.train.target_return
        if target is not None and self.solved is None and res.mean >= target:
            self.solved = (steps, self.wall_s())
        self.metrics.write("eval", {"env_steps": steps, "wall_s": round(self.wall_s(), 3),
                                    "eval_return_mean": res.mean, "eval_return_std": res.std,
                                    "eval_episodes": len(res.returns),
                                    "eval_s": round(self.eval_s, 3)})
        return res.mean, res.std

    def _finish(self) -> Result:
        self.runner.freeze()
        mean, std = self._eval()
        ckpt = self.save_checkpoint()
        wall = self.wall_s()
        result = Result(
            eval_return_mean=mean, eval_return_std=std,
            eval_episodes=self.cfg.train.eval_episodes, env_steps=self.runner.env_steps,
            updates=self.runner.updates, wall_s=wall,
            env_steps_per_s=self.runner.env_steps / max(wall, 1e-9),
            best_eval_return_mean=self.best_eval,
            solved_at_env_steps=self.solved[0] if self.solved else None,
            solved_at_wall_s=self.solved[1] if self.solved else None,
            run_dir=str(self.run_dir))
        (self.run_dir / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        self.progress.print(f"checkpoint: {ckpt}")
        return result


def train(cfg: Config, run_dir: str | Path | None = None) -> Result:
    """Train ``cfg`` in a new run directory; returns the final greedy evaluation and counters."""
    path = Path(run_dir) if run_dir else default_run_dir(cfg)
    if (path / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {str(path)!r} already holds a run: continue it with "
                          "`qfleet resume`, or choose another --run-dir")
    return Experiment(cfg, path).run()


# Fields a resumed run cannot change: they shape the networks, the replay or the roles.
FIXED_ON_RESUME = ("env.id", "algo.name", "algo.n_step", "algo.gamma", "net.torso", "net.hidden",
                   "net.dueling", "net.activation", "net.shared_torso", "actors.count",
                   "replay.kind", "replay.capacity", "replay.shards", "replay.storage",
                   "replay.scope", "runtime.backend", "algo.a3c_mode")


def check_resumable(saved: Config, cfg: Config) -> None:
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if old != new:
            raise ConfigError(f"{key} = {new!r}: cannot change on resume "
                              f"(the checkpoint has {old!r})")


def resume(run_dir: str | Path, cfg: Config | None = None) -> Result:
    """Continue a run from its latest checkpoint (``cfg`` defaults to the run's config.toml)."""
    from qfleet.config import from_dict, load_config

    run_dir = Path(run_dir)
    ckpt = checkpoint.find(run_dir)
    cfg = cfg or load_config(run_dir / "config.toml")
    check_resumable(from_dict(tomllib.loads(checkpoint.load_meta(ckpt)["config"])), cfg)
    exp = Experiment(cfg, run_dir)
    exp.restore(ckpt)
    return exp.run()
