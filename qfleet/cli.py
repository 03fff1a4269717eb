"""The ``qfleet`` command line: train, presets, config, eval, resume, plot."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from qfleet.checkpoint import CheckpointError
from qfleet.config import (
    Config,
    ConfigError,
    load_config,
    preset_names,
    resolve_source,
    to_toml,
)
from qfleet.runtime.processes import WorkerError

if TYPE_CHECKING:
    from qfleet.experiment import Result

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _config_from(args: argparse.Namespace, source: str | Path) -> Config:
    overrides = list(args.set or [])
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(source, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from qfleet.experiment import default_run_dir, train

    cfg = _config_from(args, args.config)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg, Path(args.config).stem)
    console.print(f"[bold]qfleet[/] training {escape(args.config)} -> {escape(str(run_dir))}")
    _print_result(train(cfg, run_dir))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from qfleet import checkpoint
    from qfleet.experiment import resume

    run_dir = Path(args.run_dir)
    ckpt = checkpoint.find(run_dir)
    cfg = _config_from(args, run_dir / "config.toml")
    console.print(f"[bold]qfleet[/] resuming {escape(str(run_dir))} from {ckpt.name}")
    _print_result(resume(run_dir, cfg))
    return 0


def _print_result(result: Result) -> None:
    solved = (f", first reached the target at {result.solved_at_env_steps:,} steps"
              if result.solved_at_env_steps is not None else "")
    console.print(
        f"[bold green]done[/]: eval return {result.eval_return_mean:.1f} ± "
        f"{result.eval_return_std:.1f} over {result.eval_episodes} episodes; "
        f"{result.env_steps:,} env steps, {result.updates:,} updates in {result.wall_s:.1f} s "
        f"({result.env_steps_per_s:.0f} steps/s){solved}\n"
        f"run directory: {escape(result.run_dir)}", highlight=False)


def cmd_presets(args: argparse.Namespace) -> int:
    from qfleet.algos import scheme_row

    width = max(map(len, preset_names()))
    for name in preset_names():
        cfg = load_config(name)
        row = " · ".join(f"{k}: {v}" for k, v in scheme_row(cfg).items())
        console.print(f"[bold]{name:<{width}}[/] {escape(cfg.description)}\n"
                      f"{'':<{width}} [dim]{escape(row)}[/]", highlight=False)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.set or [])
    sys.stdout.write(f"# resolved from {resolve_source(args.preset)}\n" + to_toml(cfg))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qfleet.policy_io import load_policy

    policy, cfg = load_policy(Path(args.path))
    if args.video:
        from qfleet.evaluate import record_video

        res = record_video(policy, cfg.env, args.episodes, cfg.seed, Path(args.video))
        console.print(f"videos written to {args.video}")
    else:
        from qfleet.evaluate import evaluate

        res = evaluate(policy, cfg.env, args.episodes, cfg.seed)
    console.print(f"eval return {res.mean:.1f} ± {res.std:.1f} over {len(res.returns)} episodes "
                  f"({cfg.env.id})", highlight=False)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from qfleet.plots import plot_runs

    out = plot_runs([Path(p) for p in args.run_dirs], Path(args.output))
    console.print(f"plot written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> \
            argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train, "train a preset or a TOML config")
    p.add_argument("config", nargs="?", default="cartpole-dqn", help="preset name or path.toml")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a field")
    p.add_argument("--run-dir", help="where to write the run (default runs/<name>-<time>)")
    p.add_argument("--seed", type=int, help="shorthand for --set seed=N")

    add("presets", cmd_presets, "list the presets")

    p = add("config", cmd_config, "print a preset's fully resolved TOML")
    p.add_argument("preset", help="preset name or path.toml")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")

    p = add("eval", cmd_eval, "evaluate a run's latest checkpoint greedily")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--episodes", type=_positive, default=20)
    p.add_argument("--video", metavar="DIR", help="record episodes (needs rgb_array rendering)")

    p = add("resume", cmd_resume, "continue a run from its latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a field, e.g. train.total_env_steps=100000")

    p = add("plot", cmd_plot, "draw learning curves of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="curves.png")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, CheckpointError) as err:
        err_console.print(f"[bold red]qfleet: error:[/] {escape(str(err))}", highlight=False)
        return 2
    except WorkerError as err:  # the worker's own traceback is in the message
        err_console.print(f"[bold red]qfleet: a worker failed, run stopped:[/] "
                          f"{escape(str(err))}", highlight=False)
        return 1
    except Exception as err:  # a bug or a broken learner: say so, keep the traceback
        import traceback

        traceback.print_exc()
        err_console.print(f"[bold red]qfleet: training failed:[/] {type(err).__name__}: "
                          f"{escape(str(err))}."
                          " Workers were stopped; the last checkpoint (if any) is under the "
                          "run directory's checkpoints/ and loads with `qfleet resume`.",
                          highlight=False)
        return 1
    except KeyboardInterrupt as err:
        from qfleet.experiment import Interrupted

        if isinstance(err, Interrupted):
            err_console.print(f"interrupted ({escape(str(err))}); continue with: qfleet resume "
                              f"{escape(str(err.checkpoint.parent.parent))}", highlight=False)
            return err.exit_code
        return 130
