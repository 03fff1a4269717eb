"""Metrics: one JSON object per event in metrics.jsonl, mirrored to TensorBoard and to the
trackers the config turns on (Weights & Biases, MLflow), all under one naming scheme:
``<event>/<name>`` (``train/loss``, ``eval/return_mean``, ``train/return_mean/actor_1``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qfleet.config import Config, ConfigError, QfleetWarning, to_toml

if TYPE_CHECKING:
    from qfleet.runtime import RoundReport


class MetricsWriter:
    def __init__(self, run_dir: Path, cfg: Config, info: dict[str, Any] | None = None) -> None:
        from qfleet.tracking import open_sinks

        path = run_dir / "metrics.jsonl"
        self.fh = path.open("a", buffering=1)
        self.tb = None
        self.finished = False  # set by the loop once the run ended normally
        try:
            if self.fh.tell() and not _ends_with_newline(path):
                self.fh.write("\n")  # a crash cut the last line short: start a fresh one
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # late: slow import

                self.tb = SummaryWriter(str(run_dir / "tb"))
                # Indented: TensorBoard's text tab renders it as preformatted (markdown).
                self.tb.add_text("config", "".join(f"    {line}\n"
                                                   for line in to_toml(cfg).splitlines()))
            self.sinks = open_sinks(run_dir, cfg, info or {})
        except BaseException:
            self.close()
            raise

    def write(self, event: str, record: dict[str, Any]) -> None:
        """``record`` must hold ``env_steps`` and ``wall_s`` (the public contract)."""
        self.fh.write(json.dumps({"event": event, **record}) + "\n")
        scalars = dashboard_scalars(event, record)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, record["env_steps"])
        for sink in self.sinks:
            sink.log(scalars, record["env_steps"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        for sink in getattr(self, "sinks", []):
            sink.close(self.finished)


def dashboard_scalars(event: str, record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one record as dashboards name them: ``event/name`` without the
    event repeated (eval_return_mean -> eval/return_mean), one scalar per actor for the
    per-actor lists (return_mean_by_actor -> train/return_mean/actor_0, ...)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = key.removeprefix(f"{event}_")
        if key == "env_steps" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{event}/{name}"] = value
        elif isinstance(value, dict):  # time_split, time_s: one scalar per role.activity
            out |= {f"{event}/{name}/{k}": v for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        elif isinstance(value, list) and key.endswith("_by_actor"):
            base = name.removesuffix("_by_actor")
            out |= {f"{event}/{base}/actor_{i}": v for i, v in enumerate(value)
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def is_timing(key: str) -> bool:
    """A field measured on the clock (seconds, rates, the time split and its verdict): two
    identical seeded runs agree on every other field."""
    return key.endswith(("_s", "_per_s_by_actor")) or key in ("time_split", "verdict")


def summarize_window(win: list[RoundReport], dt: float, num_actors: int,
                     batch_size: int) -> dict[str, Any]:
    """Rates and means over the rounds since the last log line."""
    steps, updates = sum(r.env_steps for r in win), sum(r.updates for r in win)
    losses, applied = sum(r.loss_count for r in win), sum(r.grads_applied for r in win)
    epsilons = [r.epsilon for r in win if r.epsilon is not None]
    lengths = [n for r in win for n in r.episode_lengths]
    stats: dict[str, Any] = {
        "env_steps_per_s": steps / dt, "updates_per_s": updates / dt,
        "episodes": sum(len(r.episode_returns) for r in win),
        "length_mean": float(np.mean(lengths)) if lengths else None,
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


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``. Lines that are not a JSON object with an
    ``event`` and ``env_steps`` (cut short by a crash, edited by hand) are skipped with a
    warning naming them."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it a qfleet run directory?)")
    records, bad = [], []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # also UnicodeDecodeError
                record = None
            if isinstance(record, dict) and "event" in record and \
                    isinstance(record.get("env_steps"), (int, float)):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (line {shown})",
                      QfleetWarning, stacklevel=2)
    return records
