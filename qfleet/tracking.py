"""Experiment trackers fed from the metrics stream: Weights & Biases and MLflow.

Both are optional extras, imported only when ``log.wandb`` / ``log.mlflow`` is on. Each sink
gets the config once and then the same scalars TensorBoard gets (``train/loss``,
``eval/return_mean``, ...) against env steps. A resumed run continues the same tracker run:
its ids are kept in RUN_DIR/tracking.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from qfleet.config import Config, ConfigError, to_dict, to_toml

IDS_FILE = "tracking.json"
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # flag: module, extra


class Sink(Protocol):
    def log(self, scalars: dict[str, float], env_steps: int) -> None: ...

    def close(self, finished: bool) -> None: ...


def check_installed(cfg: Config) -> None:
    """ConfigError naming the extra to install for each tracker the config turns on."""
    for flag, (module, extra) in EXTRAS.items():
        if getattr(cfg.log, flag) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.{flag} = true needs {module}: "
                              f"pip install 'qfleet[{extra}]'")


def flat_config(cfg: Config) -> dict[str, str]:
    """Every field as "section.key" -> its TOML value as text (strings as they are)."""
    flat: dict[str, str] = {}
    for name, value in to_dict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, item in items:
            flat[f"{name}.{key}" if key else name] = \
                item if isinstance(item, str) else json.dumps(item)
    return flat


def _ids(run_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(run_dir: Path, key: str, run_id: str) -> None:
    (run_dir / IDS_FILE).write_text(json.dumps(_ids(run_dir) | {key: run_id}) + "\n")


def open_sinks(run_dir: Path, cfg: Config, info: dict[str, Any]) -> list[Sink]:
    check_installed(cfg)
    sinks: list[Sink] = []
    try:
        if cfg.log.wandb:
            sinks.append(WandbSink(run_dir, cfg))
        if cfg.log.mlflow:
            sinks.append(MlflowSink(run_dir, cfg, info))
    except BaseException:
        for sink in sinks:
            sink.close(finished=False)
        raise
    return sinks


class WandbSink:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        import wandb

        log = cfg.log
        try:
            self.run = wandb.init(
                project=log.wandb_project, entity=log.wandb_entity or None,
                tags=log.wandb_tags or None, name=run_dir.name, config=to_dict(cfg),
                mode=None if log.wandb_mode == "auto" else log.wandb_mode,  # type: ignore[arg-type]
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
                id=_ids(run_dir).get("wandb"), resume="allow", allow_val_change=True,
                reinit="create_new")
        except (wandb.Error, ValueError) as err:  # no login, a bad entity, ...
            raise ConfigError(f"log.wandb: Weights & Biases refused the run "
                              f"({type(err).__name__}: {err})") from None
        _remember(run_dir, "wandb", self.run.id)
        # Every metric is plotted against env steps, the x-axis of the other sinks.
        self.run.define_metric("env_steps")
        self.run.define_metric("*", step_metric="env_steps")

    def log(self, scalars: dict[str, float], env_steps: int) -> None:
        self.run.log({**scalars, "env_steps": env_steps})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowSink:
    def __init__(self, run_dir: Path, cfg: Config, info: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        log = cfg.log
        try:
            self.client = MlflowClient(tracking_uri=log.mlflow_tracking_uri or None)
            resumed = "mlflow" in _ids(run_dir)
            self.run_id = self._start(run_dir, log.mlflow_experiment)
            self._log_config(cfg, info, resumed)
        except MlflowException as err:  # a refused URI, a file store MLflow turned off, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(f"log.mlflow_tracking_uri = {log.mlflow_tracking_uri!r}: "
                              f"MLflow refused it ({first})") from None
        _remember(run_dir, "mlflow", self.run_id)

    def _start(self, run_dir: Path, experiment: str) -> str:
        old = _ids(run_dir).get("mlflow")
        if old is not None:  # a resumed run continues its MLflow run
            self.client.update_run(old, status="RUNNING")
            return old
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        return str(self.client.create_run(exp_id, run_name=run_dir.name).info.run_id)

    def _log_config(self, cfg: Config, info: dict[str, Any], resumed: bool) -> None:
        from mlflow.entities import Param

        self.client.log_text(self.run_id, to_toml(cfg), "config.toml")
        if resumed:  # MLflow params are write-once: the first session's stay
            return
        params = [Param(key, value) for key, value in flat_config(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, info, "system_info.json")

    def log(self, scalars: dict[str, float], env_steps: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, env_steps) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")
