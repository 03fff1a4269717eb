"""Callbacks: qfleet.train(cfg, callbacks=[...]) calls on_metrics, on_eval and on_checkpoint
in the main process on every backend; on_eval returning True stops the run cleanly, raising
stops it at once with its workers shut down; the Optuna example prunes through on_eval; and
train validates the config it is given."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import qfleet
from qfleet import checkpoint
from qfleet.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = ["learner.learning_starts=200", "net.hidden=[32]", "train.eval_episodes=2",
         "log.progress=false", "log.tensorboard=false", "log.every=250",
         "train.eval_every=400", "checkpoint.every=500", "train.total_env_steps=1500"]


class Recorder(qfleet.Callback):
    """Records every call, with the process and thread it came from."""

    def __init__(self, stop_at_eval: int | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.where: set[tuple[int, str]] = set()
        self.stop_at_eval = stop_at_eval

    def _seen(self, hook: str, payload: Any) -> None:
        self.calls.append((hook, payload))
        self.where.add((os.getpid(), threading.current_thread().name))

    def on_metrics(self, event: str, record: dict[str, Any]) -> None:
        self._seen("metrics", {"event": event, **record})

    def on_eval(self, record: dict[str, Any]) -> bool:
        self._seen("eval", record)
        evals = sum(hook == "eval" for hook, _ in self.calls)
        return self.stop_at_eval is not None and evals >= self.stop_at_eval

    def on_checkpoint(self, path: Path) -> None:
        self._seen("checkpoint", path)


def lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset, sets", [
    ("cartpole-dqn", []),
    ("cartpole-apex", ["runtime.backend=processes", "actors.count=2"]),
], ids=["inline", "processes"])
def test_hooks_see_the_metrics_stream_and_checkpoints_in_the_main_process(
        preset: str, sets: list[str], tmp_path: Path) -> None:
    rec = Recorder()
    result = qfleet.train(load_config(preset, [*SMALL, *sets]), tmp_path / "run",
                          callbacks=[rec])
    assert rec.where == {(os.getpid(), threading.main_thread().name)}
    assert [p for hook, p in rec.calls if hook == "metrics"] == lines(tmp_path / "run")
    evals = [p for hook, p in rec.calls if hook == "eval"]
    assert [{"event": "eval", **p} for p in evals] == \
        [r for r in lines(tmp_path / "run") if r["event"] == "eval"]
    assert len(evals) >= 2 and evals[-1]["eval_return_mean"] == result.eval_return_mean
    ckpts = [p for hook, p in rec.calls if hook == "checkpoint"]
    assert len(ckpts) >= 2 and ckpts[-1] == checkpoint.find(tmp_path / "run")
    assert all(isinstance(p, Path) for p in ckpts)


@pytest.mark.parametrize("preset, sets", [
    ("cartpole-dqn", []),
    ("cartpole-gorila-sync", ["runtime.backend=processes"]),
], ids=["inline", "processes"])
def test_on_eval_true_stops_the_run_cleanly(preset: str, sets: list[str],
                                            tmp_path: Path) -> None:
    rec = Recorder(stop_at_eval=1)
    cfg = load_config(preset, [*SMALL, *sets, "train.total_env_steps=20000"])
    result = qfleet.train(cfg, tmp_path / "run", callbacks=[rec])
    first_eval = next(p for hook, p in rec.calls if hook == "eval")
    assert result.env_steps == first_eval["env_steps"] < 20000
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["env_steps"] == result.env_steps
    assert checkpoint.load_meta(checkpoint.find(tmp_path / "run"))["env_steps"] == \
        result.env_steps
    assert not multiprocessing.active_children()


def test_a_raising_callback_stops_the_run_and_its_workers(tmp_path: Path) -> None:
    class Boom(qfleet.Callback):
        def on_eval(self, record: dict[str, Any]) -> bool:
            raise RuntimeError("stop right here")

    cfg = load_config("cartpole-apex", [*SMALL, "runtime.backend=processes", "actors.count=2"])
    with pytest.raises(RuntimeError, match="stop right here"):
        qfleet.train(cfg, tmp_path / "run", callbacks=[Boom()])
    assert not multiprocessing.active_children()
    qfleet.resume(tmp_path / "run")  # the run dir was released, its checkpoint resumes
    assert json.loads((tmp_path / "run" / "result.json").read_text())["env_steps"] >= 1500


def test_an_object_without_hooks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="has none of the hooks on_metrics, on_eval"):
        qfleet.train(load_config("cartpole-dqn", SMALL), tmp_path / "run", callbacks=[object()])
    assert not (tmp_path / "run").exists()


def test_train_and_resume_validate_a_config_changed_after_loading(tmp_path: Path,
                                                                  tiny_run: Path) -> None:
    cfg = load_config("cartpole-dqn", SMALL)
    cfg.learner.lr = -1
    with pytest.raises(ConfigError, match=r"learner\.lr = -1: must be > 0\.0"):
        qfleet.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = load_config(tiny_run / "config.toml")
    cfg.env.wrappers = ["no_such_module_xyz:wrap"]
    before = (tiny_run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"env\.wrappers\[0\] = 'no_such_module_xyz:wrap'"):
        qfleet.resume(tiny_run, cfg)
    assert (tiny_run / "metrics.jsonl").read_text() == before


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                    reason="the tune extra (optuna) is not installed")
def test_optuna_example_prunes_a_trial_through_on_eval(tmp_path: Path) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    sys.path.insert(0, str(EXAMPLES))
    try:
        import optuna_cartpole as example
    finally:
        sys.path.remove(str(EXAMPLES))
    sets = [s for s in SMALL if not s.startswith("train.total_env_steps")]
    study = example.make_study(seed=0, startup_trials=1)
    # An earlier trial that returned 500 at every step: the median a trial must reach.
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3, "target_update_every": 128}, value=500.0,
        distributions={"lr": FloatDistribution(1e-4, 3e-3, log=True),
                       "target_update_every": CategoricalDistribution([32, 128, 512])},
        intermediate_values={step: 500.0 for step in range(0, 1600)}))
    example.tune(study, trials=1, steps=1500, run_root=tmp_path, overrides=sets)
    trial = study.trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    (step, value), = trial.intermediate_values.items()  # pruned at its first eval
    result = json.loads((tmp_path / "trial-1" / "result.json").read_text())
    assert result["env_steps"] == step < 1500 and value < 500


@pytest.mark.slow
def test_hooks_run_in_the_driver_on_ray(tmp_path: Path) -> None:
    """Ray (a private local instance): the hooks run in the driver, and a stop works."""
    pytest.importorskip("ray")
    import ray

    rec = Recorder(stop_at_eval=2)
    # Ray's env-step count moves in whole chunks from two actors, so the second eval can land
    # well past 2 x eval_every: a total far beyond it makes "stopped by the hook" the only way
    # the run can end there.
    cfg = load_config("cartpole-apex", [*SMALL, "runtime.backend=ray", "actors.count=2",
                                        "train.total_env_steps=20000"])
    try:
        result = qfleet.train(cfg, tmp_path / "run", callbacks=[rec])
    finally:
        ray.shutdown()
    assert rec.where == {(os.getpid(), threading.main_thread().name)}
    evals = [p for hook, p in rec.calls if hook == "eval"]
    assert len(evals) == 2 and result.env_steps == evals[-1]["env_steps"] < 20000
    assert [p for hook, p in rec.calls if hook == "metrics"] == lines(tmp_path / "run")
