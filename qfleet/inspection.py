"""``qfleet inspect RUN``: how a finished or running run is doing, from its files alone
(metrics.jsonl, result.json): its rates, its replay ratio against the schedule's target,
parameter lag, restarts, and where the time went, by role, with the verdict."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qfleet.errors import ConfigError
from qfleet.metrics import read_metrics
from qfleet.timesplit import fractions, verdict

ROLES = ("actor", "worker", "learner", "aggregator")


def inspect_run(run_dir: Path) -> list[str]:
    """The report's lines."""
    records = read_metrics(run_dir)
    trains = [r for r in records if r["event"] == "train"]
    if not trains:
        raise ConfigError(f"{run_dir}: no train line in metrics.jsonl yet (one is written "
                          "every log.every env steps)")
    last, result = trains[-1], _result(run_dir)
    evals = [r for r in records if r["event"] == "eval"]
    lines = [f"{run_dir}: {_status(run_dir, result)}",
             f"  env steps {last['env_steps']:,}, updates {last['updates']:,}, "
             f"{last['wall_s']:.0f} s; last window {last['env_steps_per_s']:,.0f} env steps/s, "
             f"{last['updates_per_s']:,.1f} updates/s"]
    if evals:
        lines.append(f"  eval return {evals[-1]['eval_return_mean']:.1f} "
                     f"± {evals[-1]['eval_return_std']:.1f} at {evals[-1]['env_steps']:,} steps")
    lines.append("  " + _health(last))
    total_s = (result or {}).get("time_s") or last.get("time_s") or {}
    lines += _time_lines(total_s, last.get("verdict"))
    return lines


def _result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _status(run_dir: Path, result: dict[str, Any] | None) -> str:
    if result is not None:
        return (f"finished: eval return {result['eval_return_mean']:.1f} ± "
                f"{result['eval_return_std']:.1f}, {result['env_steps_per_s']:,.0f} env "
                "steps/s over the run")
    age = time.time() - (run_dir / "metrics.jsonl").stat().st_mtime
    return f"not finished (running, or stopped); last metrics line {age:,.0f} s ago"


def _health(last: dict[str, Any]) -> str:
    parts = []
    ratio, target = last.get("replay_ratio"), last.get("replay_ratio_target")
    if ratio is not None:
        parts.append(f"replay ratio {ratio:.2f}" +
                     (f" (target {target:.2f})" if target is not None else ""))
    if last.get("staleness") is not None:
        parts.append(f"gradient staleness {last['staleness']:.2f} versions, "
                     f"{last.get('grads_dropped', 0)} dropped")
    else:
        parts.append(f"parameter lag {last.get('param_lag', 0.0):.2f} versions")
    parts.append(f"restarts {last.get('actor_restarts', 0)}")
    return "; ".join(parts)


def _time_lines(total_s: dict[str, float], window_verdict: str | None) -> list[str]:
    if not total_s:
        return ["  time split: not measured (a run from before qfleet measured it)"]
    share = fractions(total_s)
    lines = [f"  where the time went (whole run): {verdict(share)}"]
    for role in ROLES:
        mine = sorted(((v, k.split(".", 1)[1]) for k, v in share.items()
                       if k.startswith(f"{role}.")), reverse=True)
        if mine:
            seconds = sum(v for k, v in total_s.items() if k.startswith(f"{role}."))
            lines.append(f"    {role:<10} {seconds:8.1f} s  " +
                         "  ".join(f"{name} {v:.0%}" for v, name in mine))
    if window_verdict:
        lines.append(f"  last window: {window_verdict}")
    return lines
