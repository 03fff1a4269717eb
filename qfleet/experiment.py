"""run_experiment: the training loop around any backend runner.

The runner moves data between roles; this loop only counts, logs, evaluates and
checkpoints. It reads top to bottom: build, (restore), step until done, finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qfleet import checkpoint, rundir
from qfleet.algos import ActorLearnerProgram, build_program
from qfleet.callbacks import CallbackList
from qfleet.compute import pin_torch
from qfleet.config import Config, ConfigError, to_toml, validate
from qfleet.envs import env_fn_ref
from qfleet.evaluate import EvalInterrupted, evaluate
from qfleet.memory import check_fits
from qfleet.metrics import MetricsWriter, summarize_window
from qfleet.progress import ProgressLine
from qfleet.result import Result as Result
from qfleet.resumable import check_counters, check_resumable, saved_config
from qfleet.runtime import RoundReport, WorkerError, make_runner, ray_options
from qfleet.schedules import LrSchedule
from qfleet.sysinfo import write_system_info
from qfleet.timesplit import add_times, fractions, split_record, verdict, window_times
from qfleet.tracking import check_installed
from qfleet.watchdog import Stalled, StallWatch, StopFlag, install_handlers, workers_of


class Interrupted(KeyboardInterrupt):
    """Raised after Ctrl-C / SIGTERM once a checkpoint has been written."""

    def __init__(self, signum: int, ckpt: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved to {ckpt}")
        self.exit_code = 128 + signum
        self.checkpoint = ckpt


class Diverged(RuntimeError):
    """The loss or the parameters stopped being finite; nothing from then on is saved."""


def default_run_dir(cfg: Config, name: str | None = None) -> Path:
    stem = name or f"{cfg.env.id.split('/')[-1].split(':')[-1].lower()}-{cfg.algo.name}"
    stem = re.sub(r"[^\w.-]+", "-", stem).strip("-.")  # an env_fn's "<lambda>" names no folder
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class Experiment:
    """One run in ``run_dir``. It holds the run dir's lock (``lock``, or its own) from
    before its workers start until ``close()``; ``run()`` closes it when it ends."""

    def __init__(self, cfg: Config, run_dir: Path, lock: rundir.RunLock | None = None,
                 callbacks: CallbackList | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.callbacks = callbacks or CallbackList()
        check_fits(cfg)  # before anything is allocated or any dir is made
        program = build_program(cfg)
        self.own_lock = None if lock is not None else rundir.RunLock(run_dir)
        self.flushed_before = pin_torch(cfg.runtime.torch_threads)  # restored by close()
        try:
            self.runner = make_runner(cfg.runtime.backend, program, ray_options(cfg),
                                      cfg.runtime.start_method)
        except BaseException:
            torch.set_flush_denormal(self.flushed_before)
            if self.own_lock is not None:
                self.own_lock.release(failed=True)
            raise
        self.replay_ratio_target = program.schedule.target_replay_ratio \
            if isinstance(program, ActorLearnerProgram) else None
        self.notes: list[str] = []  # printed when the run starts (what resume decided)
        self.stop = StopFlag()
        self.wall_offset = 0.0
        self.episodes: deque[float] = deque(maxlen=20)
        self.episodes_by_actor: dict[int, deque[float]] = {}
        self.window: list[RoundReport] = []
        self.last_eval: tuple[int, float, float] | None = None  # (env_steps, mean, std)
        self.best_eval = -float("inf")
        self.eval_s = 0.0  # wall time spent in greedy evals, so rates can exclude it
        self.actor_restarts = 0
        self.times: dict[str, float] = {}  # "role.activity" -> seconds, the whole run
        self.solved: tuple[int, float] | None = None
        t = cfg.train
        self.next_log, self.next_eval, self.next_ckpt = cfg.log.every, t.eval_every, \
            cfg.checkpoint.every

    # ------------------------------------------------------------ state

    def wall_s(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    def save_checkpoint(self) -> Path:
        if not all(bool(torch.isfinite(p).all()) for p in self.runner.policy_net.parameters()):
            raise self._diverged("the parameters are no longer finite")
        tensors, meta, replay = self.runner.state(self.cfg.checkpoint.replay)
        meta |= {"config": to_toml(self.cfg), "wall_s": self.wall_s(),
                 "best_eval": self.best_eval, "solved": self.solved, "eval_s": self.eval_s,
                 "actor_restarts": self.actor_restarts, "time_s": self.times,
                 "recent_returns": list(self.episodes),
                 "next": [self.next_log, self.next_eval, self.next_ckpt]}
        path = checkpoint.save(self.run_dir / "checkpoints", self.runner.env_steps, tensors,
                               meta, replay, keep=self.cfg.checkpoint.keep)
        self.callbacks.checkpoint(path)
        return path

    def restore(self, ckpt: Path) -> None:
        """Load ``ckpt`` into this run; CheckpointError if it is damaged or does not fit,
        ConfigError if this run's config changes a field fixed at the start."""
        tensors, meta, replay = checkpoint.load(ckpt)
        check_resumable(saved_config(ckpt, meta, self.cfg.env.fn), self.cfg)
        check_counters(ckpt, meta)
        try:
            self.runner.restore(tensors, meta, replay)
            self.wall_offset = meta["wall_s"]
            self.best_eval, self.solved = meta["best_eval"], meta["solved"]
            self.eval_s, self.actor_restarts = meta["eval_s"], meta["actor_restarts"]
            self.times = dict(meta.get("time_s", {}))  # older checkpoints: none measured
            self.episodes.clear()
            self.episodes.extend(meta["recent_returns"])
            self.next_log, self.next_eval, self.next_ckpt = meta["next"]
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise checkpoint.CheckpointError(
                f"{ckpt}: does not fit this run ({type(err).__name__}: {first})") from None

    def restore_latest(self) -> Path:
        """Restore the newest checkpoint that loads, saying which damaged ones it skipped."""
        _, ckpt, skipped = checkpoint.first_loadable(self.run_dir, self.restore)
        self.notes += [f"warning: skipped a damaged checkpoint: {why}" for why in skipped]
        if skipped:
            self.notes.append(f"resuming from the newest loadable checkpoint: {ckpt.name}")
        return ckpt

    def close(self) -> None:
        """Stop the workers and release the run dir (safe to call twice)."""
        self.runner.close()
        torch.set_flush_denormal(self.flushed_before)
        if self.own_lock is not None:
            self.own_lock.release()

    # ------------------------------------------------------------ loop

    def run(self) -> Result:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.t_window = self.t0
        # Written only now that a resume's restore succeeded: a failed one keeps the old file.
        (self.run_dir / "config.toml").write_text(to_toml(cfg))
        try:
            info = write_system_info(self.run_dir)
            self.metrics = MetricsWriter(self.run_dir, cfg, info)
        except BaseException:
            self.close()
            raise
        self.progress = ProgressLine(cfg.train.total_env_steps, cfg.log.progress,
                                     self.runner.env_steps)
        for note in [*self.notes, self.runner.describe()]:
            self.progress.print(note)
        handlers = install_handlers(self.stop)
        watch = StallWatch(cfg.runtime.stall_timeout_s, *workers_of(self.runner.program))
        try:
            with watch.guarded():
                while not (stopped := self._stopped_by()):
                    self._round(watch)
            return self._finish(stopped)
        except (WorkerError, Stalled) as err:  # the run cannot go on: say where it can resume
            raise type(err)(f"{err}\n{self._resume_hint()}") from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            try:
                self.progress.close()
                self.metrics.close()  # may raise (a full disk): the workers stop anyway
            finally:
                self.close()

    def _round(self, watch: StallWatch) -> None:
        t0 = time.perf_counter()
        watch.arm(True)
        report = self.runner.step()
        watch.arm(False)
        self._after_round(report)
        self._stop_if_asked()
        silent = watch.after_round(report, time.perf_counter() - t0)
        if silent:
            where = self.runner.dump_stacks(silent)
            with contextlib.suppress(Exception):  # a stuck worker may hold a checkpoint up
                self.save_checkpoint()
            raise Stalled(f"{watch.message(silent)}; {where}")

    def _stop_if_asked(self) -> None:
        if self.stop.signum is not None:
            self.runner.freeze()
            raise Interrupted(self.stop.signum, self.save_checkpoint())

    def _resume_hint(self) -> str:
        try:
            ckpt = checkpoint.find(self.run_dir)
        except checkpoint.CheckpointError:
            return "no checkpoint was written yet"
        return f"last checkpoint: {ckpt} (continue with `qfleet resume {self.run_dir}`)"

    def _stopped_by(self) -> str:
        """What ends the run now ('' while it goes on): its env steps, its target return,
        its wall-time budget, or a callback."""
        train = self.cfg.train
        if self.runner.env_steps >= train.total_env_steps:
            return "env steps"
        if train.target_return is not None and self.solved is not None:
            return "target return"
        if train.max_wall_s and self.wall_s() >= train.max_wall_s:
            return "wall time"
        return "callback" if self.callbacks.stop_requested else ""

    def _diverged(self, what: str) -> Diverged:
        return Diverged(f"training diverged at env step {self.runner.env_steps:,} (update "
                        f"{self.runner.updates:,}): {what}; nothing from this point was "
                        f"saved, {self._resume_hint()}. Try a lower learner.lr or "
                        "learner.max_grad_norm")

    def _after_round(self, report: RoundReport) -> None:
        if report.loss_count and not math.isfinite(report.loss_sum):
            raise self._diverged(f"the loss is {report.loss_sum}")
        self.window.append(report)
        for note in report.notes:
            self.progress.print(note)
        self.episodes.extend(report.episode_returns)
        add_times(self.times, report.times.items())
        for actor, returns in report.returns_by_actor.items():
            self.episodes_by_actor.setdefault(actor, deque(maxlen=20)).extend(returns)
        steps = self.runner.env_steps
        if steps >= self.next_log:
            self._log_train()
            self.next_log = steps + self.cfg.log.every
        if self.cfg.train.eval_every and steps >= self.next_eval:
            if self._eval() is None:
                return  # Ctrl-C abandoned it: the stop comes next
            self.next_eval = steps + self.cfg.train.eval_every
        if self.cfg.checkpoint.every and steps >= self.next_ckpt:
            self.next_ckpt = steps + self.cfg.checkpoint.every  # saved with the checkpoint
            self.save_checkpoint()

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
            "replay_size": self.runner.replay_size, "actor_restarts": self.actor_restarts,
            "lr": LrSchedule.of(self.cfg).at(self.runner.env_steps),  # the rate now
            "replay_ratio_target": self.replay_ratio_target,
            **split_record(window_times(win), self.times)}
        if self.runner.program.num_actors > 1:  # Ape-X actors explore differently: show each
            record["return_mean_by_actor"] = [
                float(np.mean(d)) if (d := self.episodes_by_actor.get(i)) else None
                for i in range(self.runner.program.num_actors)]
        self.metrics.write("train", record)
        self.callbacks.metrics("train", record)
        last = self.last_eval[1] if self.last_eval else None
        self.progress.update(record | {"eval_return_mean": last})

    def _eval(self) -> tuple[float, float] | None:
        """The greedy eval at this step (None: a Ctrl-C abandoned it)."""
        steps = self.runner.env_steps
        if self.last_eval is not None and self.last_eval[0] == steps:
            return self.last_eval[1], self.last_eval[2]
        t0 = time.perf_counter()
        try:
            res = evaluate(self.runner.policy_net, self.cfg.env, self.cfg.train.eval_episodes,
                           self.cfg.seed, should_stop=lambda: self.stop.signum is not None,
                           epsilon=self.cfg.train.eval_epsilon)
        except EvalInterrupted:
            return None
        finally:
            self.eval_s += time.perf_counter() - t0
        self.last_eval = (steps, res.mean, res.std)
        self.best_eval = max(self.best_eval, res.mean)
        target = self.cfg.train.target_return
        if target is not None and self.solved is None and res.mean >= target:
            self.solved = (steps, self.wall_s())
        record = {"env_steps": steps, "wall_s": round(self.wall_s(), 3),
                  "eval_return_mean": res.mean, "eval_return_std": res.std,
                  "eval_length_mean": res.length_mean, "eval_episodes": len(res.returns),
                  "eval_s": round(self.eval_s, 3)}
        self.metrics.write("eval", record)
        self.callbacks.metrics("eval", record)
        self.callbacks.eval(record)
        return res.mean, res.std

    def _finish(self, stopped: str) -> Result:
        self.runner.freeze()
        evaluated = self._eval()
        self._stop_if_asked()
        assert evaluated is not None  # only a stop abandons an eval
        mean, std = evaluated
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
            run_dir=str(self.run_dir), time_split=fractions(self.times), time_s=self.times,
            verdict=verdict(fractions(self.times)), stopped=stopped)
        (self.run_dir / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        self.metrics.finished = True
        self.progress.print(f"checkpoint: {ckpt}")
        return result


def train(cfg: Config, run_dir: str | Path | None = None, *, overwrite: bool = False,
          callbacks: Iterable[Any] = (), env_fn: Callable[..., Any] | None = None) -> Result:
    """Train ``cfg`` in a new run directory; returns the final greedy evaluation and counters.
    ``overwrite``: replace a run already in ``run_dir`` (its checkpoints are deleted).
    ``callbacks``: objects with on_metrics / on_eval / on_checkpoint (qfleet.callbacks).
    ``env_fn``: builds the env instead of env.id (called with env.kwargs); it must pickle
    when workers are spawned, any function does when they fork."""
    cfg = _checked(cfg, env_fn)
    path = Path(run_dir) if run_dir else default_run_dir(cfg)
    hooks = CallbackList(callbacks)
    with rundir.claimed(path) as lock:
        found = rundir.existing_run(path)
        if found and not overwrite:
            raise ConfigError(_holds_a_run(path))
        exp = Experiment(cfg, path, lock, hooks)
        if found:  # only now that the new run was built: a broken config keeps the old one
            rundir.clear(path)
        return exp.run()


def _holds_a_run(path: Path) -> str:
    ckpts = checkpoint.candidates(path)
    if ckpts:
        return (f"run directory {str(path)!r} already holds a run (checkpoint {ckpts[0].name}):"
                f" continue it with `qfleet resume {path}`, replace it with --overwrite, or "
                "choose another --run-dir")
    return (f"run directory {str(path)!r} holds a run that stopped before its first checkpoint:"
            f" `qfleet resume {path}` starts it again from step 0 with its config.toml, "
            "--overwrite replaces it with this config, or choose another --run-dir")


def _checked(cfg: Config, env_fn: Callable[..., Any] | None) -> Config:
    """``cfg`` validated as it is now (a field set after load_config is checked too), with
    ``env_fn`` in it: env.id then names the function (module:name when it imports back)."""
    env_fn = env_fn or cfg.env.fn  # set on the EnvConfig by hand: recorded the same way
    if env_fn is not None:
        env_id, by_name = env_fn_ref(env_fn)
        cfg = dataclasses.replace(cfg, env=dataclasses.replace(
            cfg.env, id=env_id, fn=None if by_name else env_fn))  # replace() validates
    else:
        validate(cfg)
    check_installed(cfg)
    return cfg


def resume(run_dir: str | Path, cfg: Config | None = None, *, callbacks: Iterable[Any] = (),
           env_fn: Callable[..., Any] | None = None) -> Result:
    """Continue a run from its newest loadable checkpoint (``cfg`` defaults to the run's
    config.toml). The whole resumed run is built and the checkpoint loaded into it before
    anything in the run dir changes. A run stopped before its first checkpoint starts
    again from step 0. ``callbacks``, ``env_fn``: as for ``train``."""
    from qfleet.config import load_config

    run_dir = Path(run_dir)
    if not checkpoint.candidates(run_dir) and not (run_dir / "config.toml").is_file():
        checkpoint.find(run_dir)  # raises: nothing to resume
    hooks = CallbackList(callbacks)
    with rundir.claimed(run_dir) as lock:
        cfg = _checked(cfg or load_config(run_dir / "config.toml", env_fn=env_fn), env_fn)
        exp = Experiment(cfg, run_dir, lock, hooks)
        try:
            if checkpoint.candidates(run_dir):
                exp.restore_latest()
            else:
                exp.notes.append(f"{run_dir} has no checkpoint (it stopped before its first): "
                                 "starting it again from step 0")
                rundir.clear(run_dir)
        except BaseException:
            exp.close()
            raise
        return exp.run()
