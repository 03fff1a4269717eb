"""The commands that look at runs: ``compare``, ``inspect`` and ``plot``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from qfleet.cli_args import consoles as _consoles
from qfleet.cli_args import escape as _escape
from qfleet.cli_args import positive, positive_float


def cmd_plot(args: argparse.Namespace) -> int:
    from qfleet.plots import plot_runs

    x_axes = ("steps", "wall") if args.x == "both" else (args.x,)
    out = plot_runs([Path(p) for p in args.run_dirs], Path(args.output), args.metric, x_axes,
                    args.smooth)
    _consoles()[0].print(f"plot written to {_escape(out)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from qfleet import compare

    console = _consoles()[0]
    report, head, rows = compare.run(args, lambda line: console.print(_escape(line),
                                                                      highlight=False))
    view = Table(*head)
    for row in rows:
        view.add_row(*map(_escape, row))
    console.print(view)
    console.print(f"report: {_escape(report)}", highlight=False)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qfleet.inspection import inspect_run

    for line in inspect_run(Path(args.run_dir)):
        _consoles()[0].print(_escape(line), highlight=False)
    return 0


def add_insight_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("compare", cmd_compare, "train several configs on one budget and seeds, then "
            "write a side-by-side report (report.html, PNGs)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="preset, path.toml, or a trained run dir (or seeds folder) to reuse")
    p.add_argument("--seeds", type=positive, default=2, metavar="N",
                   help="seeds 0..N-1 for every config (default 2)")
    p.add_argument("--budget-steps", type=positive, metavar="N",
                   help="train.total_env_steps for every config (default: each its own)")
    p.add_argument("--budget-s", type=positive_float, metavar="S",
                   help="train.max_wall_s for every config: each run ends after S seconds "
                        "of training or its steps, whichever comes first")
    p.add_argument("--jobs", type=positive, default=1, metavar="N",
                   help="runs trained at once, each in its own process (default 1: on a "
                        "small machine runs at once slow each other and skew the timings)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a field in every config")
    p.add_argument("--threshold", type=float,
                   help="return for the time-to-threshold columns (default: the configs' "
                        "common train.target_return)")
    p.add_argument("-o", "--output", help="report folder (default compare-<time>)")

    p = add("inspect", cmd_inspect, "how a run is doing: rates, replay ratio, lag, and where "
            "the time goes by role")
    p.add_argument("run_dir")

    p = add("plot", cmd_plot, "draw learning curves of one or more runs (runs that differ "
            "only by seed as a mean with a band)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or a folder of seed-N runs (train --seeds)")
    p.add_argument("-o", "--output", default="curves.png",
                   help="image file (its suffix picks the format), or a folder for curves.png")
    p.add_argument("--metric", default="eval_return_mean",
                   help="the field to draw (default: the greedy eval return), e.g. "
                        "return_mean, loss, env_steps_per_s")
    p.add_argument("--x", choices=("steps", "wall", "both"), default="both",
                   help="x axis: env steps, wall time, or both side by side")
    p.add_argument("--smooth", type=positive, default=1, metavar="N",
                   help="moving average over the last N points")
