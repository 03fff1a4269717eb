"""Learning curves: greedy eval return vs env steps and vs wall time, runs overlaid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

from qfleet.config import ConfigError
from qfleet.metrics import read_metrics


def plot_runs(run_dirs: list[Path], output: Path) -> Path:
    fig, (ax_steps, ax_wall) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise ConfigError(f"{run_dir}: no metrics.jsonl (is it a qfleet run directory?)")
        records = read_metrics(run_dir)
        evals = [r for r in records if r["event"] == "eval"]
        trains = [r for r in records if r["event"] == "train" and r.get("return_mean") is not None]
        label = run_dir.name
        for ax, x in ((ax_steps, "env_steps"), (ax_wall, "wall_s")):
            line = ax.plot([r[x] for r in evals], [r["eval_return_mean"] for r in evals],
                           marker="o", ms=3, label=f"{label} (greedy eval)")[0]
            ax.plot([r[x] for r in trains], [r["return_mean"] for r in trains], alpha=0.35,
                    color=line.get_color(), label=f"{label} (training episodes)")
    ax_steps.set_xlabel("environment steps")
    ax_wall.set_xlabel("wall time (s)")
    ax_steps.set_ylabel("episode return")
    for ax in (ax_steps, ax_wall):
        ax.grid(alpha=0.3)
    ax_wall.legend(fontsize=8, loc="lower right")
    fig.suptitle("qfleet learning curves")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
