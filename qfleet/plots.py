"""Learning curves: greedy eval return vs env steps and vs wall time, runs overlaid."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

from qfleet.config import ConfigError, QfleetWarning
from qfleet.metrics import read_metrics

DEFAULT_NAME = "curves.png"


def output_path(output: Path) -> Path:
    """Where the figure goes: ``output``, or ``output/curves.png`` for a directory; its
    format (from the suffix) must be one matplotlib writes."""
    if output.is_dir():
        output = output / DEFAULT_NAME
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(f"-o {str(output)!r}: unknown image format {suffix!r}; allowed "
                          f"suffixes: {', '.join('.' + f for f in sorted(formats))}")
    return output


def _points(records: list[dict[str, object]], event: str, x: str,
            y: str) -> tuple[list[float], list[float]]:
    """(x, y) of the ``event`` records where both are numbers."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    pairs = [(r[x], r[y]) for r in records
             if r.get("event") == event and number(r.get(x)) and number(r.get(y))]
    return [float(a) for a, _ in pairs], [float(b) for _, b in pairs]  # type: ignore[arg-type]


def plot_runs(run_dirs: list[Path], output: Path) -> Path:
    output = output_path(output)
    runs = [(run_dir, read_metrics(run_dir)) for run_dir in run_dirs]
    for run_dir, records in runs:
        if not records:
            warnings.warn(f"{run_dir}: metrics.jsonl has no records yet; nothing to draw",
                          QfleetWarning, stacklevel=2)
    if not any(records for _, records in runs):
        raise ConfigError("no run has any metrics yet: " + ", ".join(map(str, run_dirs)))
    fig, (ax_steps, ax_wall) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run_dir, records in runs:
        label = run_dir.name
        for ax, x in ((ax_steps, "env_steps"), (ax_wall, "wall_s")):
            line = ax.plot(*_points(records, "eval", x, "eval_return_mean"), marker="o", ms=3,
                           label=f"{label} (greedy eval)")[0]
            ax.plot(*_points(records, "train", x, "return_mean"), alpha=0.35,
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
    try:
        fig.savefig(output, dpi=110)
    finally:
        plt.close(fig)
    return output
