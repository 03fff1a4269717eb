"""Tracking: TensorBoard (config text, episode length, learning rate, per-actor scalars, one
naming scheme), Weights & Biases (offline) and MLflow (a local file store), each read back
from what the real library wrote, against metrics.jsonl."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _wandb_offline import read_offline_run

from qfleet import rundir
from qfleet.config import Config, ConfigError, load_config, to_dict, to_toml
from qfleet.experiment import resume, train
from qfleet.tracking import flat_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["learner.learning_starts=200", "net.hidden=[32]", "train.eval_episodes=2",
         "log.progress=false", "checkpoint.every=0", "log.every=250", "train.eval_every=500"]


def records(run_dir: Path, event: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_tensorboard_holds_the_config_and_one_naming_scheme(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("cartpole-apex", [*SMALL, "runtime.backend=inline", "actors.count=2",
                                        "train.total_env_steps=1000", "log.tensorboard=true"])
    train(cfg, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/return_mean", "eval/return_mean",
            "eval/return_std", "eval/length_mean", "train/env_steps_per_s/actor_0",
            "train/env_steps_per_s/actor_1"} <= scalars, sorted(scalars)
    assert not [t for t in scalars if t.startswith("eval/eval_")], sorted(scalars)
    evals = records(tmp_path / "run", "eval")
    assert len(evals) >= 2
    assert [(e.step, e.value) for e in acc.Scalars("eval/return_mean")] == \
        [(r["env_steps"], pytest.approx(r["eval_return_mean"])) for r in evals]
    assert all(e.value == pytest.approx(cfg.learner.lr) for e in acc.Scalars("train/lr"))
    # CartPole's return is its episode length: the two agree in every greedy eval
    assert [e.value for e in acc.Scalars("eval/length_mean")] == \
        [pytest.approx(r["eval_return_mean"]) for r in evals]
    (text,) = acc.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert shown.replace("    ", "") == to_toml(cfg)


@pytest.fixture
def trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """W&B offline and MLflow on a file store, both under tmp_path; wandb's service process
    is shut down afterwards, also when the test fails."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
    (tmp_path / "wandb-home").mkdir()
    try:
        yield {"wandb_dir": str(tmp_path / "wandb-home"),
               "mlflow_uri": f"file:{tmp_path / 'mlruns'}"}
    finally:
        import wandb

        wandb.teardown()


def _wandb_run(wandb_dir: str, run_id: str) -> list[Path]:
    """The run's .wandb files, read once wandb's service process has ended: the service
    writes them, and on a loaded machine (CI, once) ``finish()`` returned before its run
    record was on disk."""
    import wandb

    wandb.teardown()
    return sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def _check_wandb(wandb_file: Path, cfg: Config, run_dir: Path) -> None:
    logged = read_offline_run(wandb_file)
    assert (logged.project, logged.tags, logged.exit_code) == \
        ("qfleet-tests", ["ci", "cartpole"], 0)
    assert logged.config == json.loads(json.dumps(to_dict(cfg)))
    evals, trains = records(run_dir, "eval"), records(run_dir, "train")
    assert [(h["env_steps"], h["eval/return_mean"]) for h in logged.history
            if "eval/return_mean" in h] == \
        [(r["env_steps"], pytest.approx(r["eval_return_mean"])) for r in evals]
    assert sum(r["loss"] is not None for r in trains) >= 2
    assert [h["env_steps"] for h in logged.history if "train/loss" in h] == \
        [r["env_steps"] for r in trains if r["loss"] is not None]


def _check_mlflow(client: Any, run_id: str, cfg: Config, run_dir: Path) -> None:
    import mlflow.artifacts

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == flat_config(cfg)
    history = client.get_metric_history(run_id, "eval/return_mean")
    assert [(m.step, m.value) for m in history] == \
        [(r["env_steps"], pytest.approx(r["eval_return_mean"]))
         for r in records(run_dir, "eval")]
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.toml") == to_toml(cfg)
    info = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/system_info.json")
    assert info == json.loads((run_dir / "system_info.json").read_text())


def test_wandb_offline_and_mlflow_get_the_metrics_stream_and_config(
        tmp_path: Path, trackers: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    sets = [*SMALL, "train.total_env_steps=1000", "log.tensorboard=false", "log.wandb=true",
            "log.wandb_project=qfleet-tests", "log.wandb_tags=['ci', 'cartpole']",
            "log.mlflow=true", f"log.mlflow_tracking_uri='{trackers['mlflow_uri']}'",
            "log.mlflow_experiment=qfleet-tests"]
    cfg = load_config("cartpole-dqn", sets)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    ids = json.loads((run_dir / "tracking.json").read_text())
    evals = records(run_dir, "eval")
    assert len(evals) >= 2 and set(ids) == {"wandb", "mlflow"}
    (wandb_file,) = _wandb_run(trackers["wandb_dir"], ids["wandb"])
    _check_wandb(wandb_file, cfg, run_dir)
    client = MlflowClient(tracking_uri=trackers["mlflow_uri"])
    _check_mlflow(client, ids["mlflow"], cfg, run_dir)

    # A resumed run continues both tracker runs.
    more = load_config(run_dir / "config.toml", ["train.total_env_steps=1500"])
    resume(run_dir, more)
    assert json.loads((run_dir / "tracking.json").read_text()) == ids
    # (one offline folder per session, unless both started within the same second)
    resumed = read_offline_run(_wandb_run(trackers["wandb_dir"], ids["wandb"])[-1])
    assert resumed.run_id == ids["wandb"]
    assert max(h["env_steps"] for h in resumed.history if "env_steps" in h) >= 1500
    steps = [m.step for m in client.get_metric_history(ids["mlflow"], "eval/return_mean")]
    assert steps == sorted(steps) and steps[-1] >= 1500 > steps[len(evals) - 1]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"


def test_a_tracker_that_is_not_installed_names_its_extra(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    for module, flag in (("wandb", "log.wandb=true"), ("mlflow", "log.mlflow=true")):
        monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when it is absent
        cfg = load_config("cartpole-dqn", [*SMALL, flag])
        with pytest.raises(ConfigError, match=rf"needs {module}: pip install 'qfleet\[{module}\]'"):
            train(cfg, tmp_path / module)
        assert not (tmp_path / module).exists()  # refused before the run dir was made


def test_a_store_mlflow_refuses_is_one_config_error_and_frees_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = load_config("cartpole-dqn", [*SMALL, "log.mlflow=true", "log.tensorboard=false",
                                       f"log.mlflow_tracking_uri='file:{tmp_path / 'ml'}'"])
    with pytest.raises(ConfigError, match=r"log.mlflow_tracking_uri = 'file:.*MLflow refused"):
        train(cfg, tmp_path / "run")
    rundir.RunLock(tmp_path / "run").release()  # the failed run let go of its directory
