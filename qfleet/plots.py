"""Learning curves: a metric vs env steps and vs wall time, runs overlaid. Runs that differ
only by their seed (``qfleet train --seeds``) are one curve: the mean over seeds with a band
of ± one standard deviation (a seed that stopped early holds its last value); a single run's
greedy eval carries its episodes' std."""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from qfleet.config import ConfigError, QfleetWarning
from qfleet.metrics import read_metrics
from qfleet.rundir import SEED_DIR

DEFAULT_NAME = "curves.png"
DEFAULT_METRIC = "eval_return_mean"
X_FIELDS = {"steps": ("env_steps", "environment steps"), "wall": ("wall_s", "wall time (s)")}

Records = list[dict[str, Any]]


@dataclass
class Curve:
    """One line in the figure: one run, or the runs of one config over several seeds."""

    label: str
    runs: list[tuple[Path, Records]]


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


def expand(run_dirs: list[Path]) -> list[Path]:
    """Run dirs as given, except that a folder of ``seed-N`` runs (``train --seeds``)
    stands for its runs, in seed order."""
    out: list[Path] = []
    for run_dir in run_dirs:
        seeds = sorted((int(m.group(1)), p) for p in run_dir.glob("seed-*")
                       if (m := SEED_DIR.fullmatch(p.name)) and (p / "metrics.jsonl").is_file())
        if seeds and not (run_dir / "metrics.jsonl").is_file():
            out += [p for _, p in seeds]
        else:
            out.append(run_dir)
    return out


def _config_but_seed(run_dir: Path) -> str | None:
    """The run's config without its seed, as a key: runs with equal keys differ only by
    seed. None when there is no readable config.toml (the run stays a curve of its own)."""
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, ValueError):
        return None
    cfg.pop("seed", None)
    return repr(sorted(cfg.items()))


def group_by_seed(runs: list[tuple[Path, Records]]) -> list[Curve]:
    groups: dict[str, Curve] = {}
    for k, (run_dir, records) in enumerate(runs):
        key = _config_but_seed(run_dir) or f"#{k}"
        groups.setdefault(key, Curve(run_dir.name, [])).runs.append((run_dir, records))
    for curve in groups.values():
        if len(curve.runs) > 1:
            parents = {p.parent for p, _ in curve.runs}
            name = parents.pop().name if len(parents) == 1 and \
                all(SEED_DIR.fullmatch(p.name) for p, _ in curve.runs) else curve.label
            curve.label = f"{name} (mean ± std, {len(curve.runs)} seeds)"
    return list(groups.values())


def points(records: Records, event: str, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the ``event`` records where both are numbers."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    pairs = [(float(r[x]), float(r[y])) for r in records
             if r.get("event") == event and number(r.get(x)) and number(r.get(y))]
    return np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])


def event_of(metric: str, runs: list[tuple[Path, Records]]) -> str:
    """The event whose records hold ``metric`` (eval first: the greedy return)."""
    for event in ("eval", "train"):
        if any(r.get("event") == event and metric in r for _, records in runs
               for r in records):
            return event
    fields = sorted({k for _, records in runs for r in records for k, v in r.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
    raise ConfigError(f"--metric {metric!r}: no run records it; numeric fields in these "
                      f"runs: {', '.join(fields)}")


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    if window <= 1 or len(y) == 0:
        return y
    csum = np.concatenate([[0.0], np.cumsum(y)])
    end = np.arange(1, len(y) + 1)
    start = np.maximum(0, end - window)
    return (csum[end] - csum[start]) / (end - start)


def mean_band(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Mean and std over runs, each interpolated onto every run's x values from the latest
    first point on. A run that ended early (it reached train.target_return, say) holds its
    last value to the end of the longest one."""
    order = [np.argsort(x, kind="stable") for x in xs]  # a resumed run may step back
    xs, ys = [x[o] for x, o in zip(xs, order, strict=True)], \
        [y[o] for y, o in zip(ys, order, strict=True)]
    lo = max(x[0] for x in xs)
    grid = np.unique(np.concatenate([x[x >= lo] for x in xs]))
    stacked = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys, strict=True)])
    return grid, stacked.mean(axis=0), stacked.std(axis=0)


def _draw(ax: Axes, curve: Curve, event: str, x: str, metric: str, window: int) -> None:
    xys = [points(records, event, x, metric) for _, records in curve.runs]
    xys = [(xv, smooth(yv, window)) for xv, yv in xys if len(xv)]
    if not xys:
        return
    if len(xys) > 1:
        grid, mean, std = mean_band([a for a, _ in xys], [b for _, b in xys])
        line = ax.plot(grid, mean, label=curve.label)[0]
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        return
    (xv, yv), records = xys[0], curve.runs[0][1]
    line = ax.plot(xv, yv, marker="o", ms=3, label=f"{curve.label} ({metric})")[0]
    if metric == DEFAULT_METRIC:  # the eval episodes' spread, and the training episodes
        _, std = points(records, event, x, "eval_return_std")
        if len(std) == len(yv):
            ax.fill_between(xv, yv - std, yv + std, color=line.get_color(), alpha=0.15)
        ax.plot(*points(records, "train", x, "return_mean"), alpha=0.35,
                color=line.get_color(), label=f"{curve.label} (training episodes)")


def plot_runs(run_dirs: list[Path], output: Path, metric: str = DEFAULT_METRIC,
              x_axes: tuple[str, ...] = ("steps", "wall"), window: int = 1) -> Path:
    """Draw ``metric`` of every run (seed folders expanded, seeds of one config merged)
    against each of ``x_axes`` ('steps', 'wall'), smoothed over ``window`` points."""
    output = output_path(output)
    runs = [(run_dir, read_metrics(run_dir)) for run_dir in expand(run_dirs)]
    for run_dir, records in runs:
        if not records:
            warnings.warn(f"{run_dir}: metrics.jsonl has no records yet; nothing to draw",
                          QfleetWarning, stacklevel=2)
    if not any(records for _, records in runs):
        raise ConfigError("no run has any metrics yet: " + ", ".join(map(str, run_dirs)))
    event = event_of(metric, runs)
    curves = group_by_seed(runs)
    fig, axes = plt.subplots(1, len(x_axes), figsize=(6 * len(x_axes), 4.5), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], x_axes, strict=True):
        field, label = X_FIELDS[name]
        for curve in curves:
            _draw(ax, curve, event, field, metric, window)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("episode return" if metric == DEFAULT_METRIC else metric)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("qfleet learning curves" + (f" (smoothed over {window} points)"
                                             if window > 1 else ""))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(output, dpi=110)
    finally:
        plt.close(fig)
    return output
