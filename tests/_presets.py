"""A preset trained briefly on one backend, then evaluated through `qfleet eval`: what the
pixel presets' tests (MinAtar, Atari) check on every backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import qfleet
from qfleet.config import load_config


def train_briefly_and_evaluate(preset: str, backend: str, overrides: list[str], steps: int,
                               episodes: int, run_dir: Path,
                               run_cli: Callable[..., Any]) -> None:
    cfg = load_config(preset, [*overrides, f"train.total_env_steps={steps}",
                               f"train.eval_episodes={episodes}", "train.eval_every=0",
                               "checkpoint.every=0", f"runtime.backend={backend}"])
    try:
        result = qfleet.train(cfg, run_dir)
    finally:
        if backend == "ray":
            import ray
            ray.shutdown()
    assert result.env_steps >= steps and result.updates > 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    losses = [m["loss"] for m in metrics if m["event"] == "train" and m.get("loss") is not None]
    assert losses and all(np.isfinite(losses))
    proc = run_cli("eval", str(run_dir), "--episodes", str(episodes))
    assert proc.returncode == 0, proc.stderr
    assert f"over {episodes} episodes ({cfg.env.id})" in proc.stdout, proc.stdout
