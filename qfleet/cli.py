"""The ``qfleet`` command line: train, presets, config, eval, resume, export, push, compare,
inspect, plot."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qfleet.cli_args import Version, positive, seed_list
from qfleet.cli_args import consoles as _consoles
from qfleet.cli_args import escape as _escape
from qfleet.cli_insight import add_insight_commands

# Only the standard library at import time: a Ctrl-C while torch loads lands in main()'s
# handler, and `qfleet --help` answers at once.
if TYPE_CHECKING:

    from qfleet.config import Config
    from qfleet.experiment import Result

# OS errors a user causes with a path (permissions, a file where a folder goes, a full
# disk): one line naming the path, exit 2. Other OS errors are bugs and keep a traceback.
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
               errno.ENOSPC, errno.EROFS, errno.EEXIST, errno.EDQUOT, errno.ENAMETOOLONG,
               errno.ELOOP, errno.EFBIG}


def _config_from(args: argparse.Namespace, source: str | Path) -> Config:
    from qfleet.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(source, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from qfleet.experiment import default_run_dir, train

    cfg = _config_from(args, args.config)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg, Path(args.config).stem)
    if args.seeds:
        return _train_seeds(args, run_dir)
    args.resolved_run_dir = run_dir
    out, _ = _consoles()
    out.print(f"[bold]qfleet[/] training {_escape(args.config)} -> {_escape(run_dir)}")
    _print_result(train(cfg, run_dir, overwrite=args.overwrite))
    return 0


def _train_seeds(args: argparse.Namespace, base: Path) -> int:
    """One run per seed, one after the other, in ``base/seed-N``; then their spread."""
    from qfleet.experiment import train
    from qfleet.rundir import seed_dir

    out, _ = _consoles()
    returns: list[float] = []
    cfgs = [_config_from(argparse.Namespace(**{**vars(args), "seed": seed}), args.config)
            for seed in args.seeds]  # every seed's config is valid before the first run
    for k, (seed, cfg) in enumerate(zip(args.seeds, cfgs, strict=True)):
        args.resolved_run_dir = run_dir = seed_dir(base, seed)
        out.print(f"[bold]qfleet[/] training {_escape(args.config)} seed {seed} "
                  f"({k + 1}/{len(args.seeds)}) -> {_escape(run_dir)}")
        result = train(cfg, run_dir, overwrite=args.overwrite)
        _print_result(result)
        returns.append(result.eval_return_mean)
    import numpy as np

    out.print(f"[bold green]seeds {', '.join(map(str, args.seeds))}[/]: final eval return "
              f"{np.mean(returns):.1f} ± {np.std(returns):.1f} over seeds (each: "
              f"{', '.join(f'{r:.1f}' for r in returns)}); draw them with "
              f"`qfleet plot {_escape(base)}`", highlight=False)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from qfleet.experiment import resume

    run_dir = Path(args.run_dir)
    args.resolved_run_dir = run_dir
    cfg = _config_from(args, run_dir / "config.toml") if (run_dir / "config.toml").is_file() \
        else None
    out, _ = _consoles()
    out.print(f"[bold]qfleet[/] resuming {_escape(run_dir)}")
    _print_result(resume(run_dir, cfg))
    return 0


def _print_result(result: Result) -> None:
    solved = (f", first reached the target at {result.solved_at_env_steps:,} steps"
              if result.solved_at_env_steps is not None else "")
    if result.stopped == "wall time":
        solved += ", ended by train.max_wall_s"
    _consoles()[0].print(
        f"[bold green]done[/]: eval return {result.eval_return_mean:.1f} ± "
        f"{result.eval_return_std:.1f} over {result.eval_episodes} episodes; "
        f"{result.env_steps:,} env steps, {result.updates:,} updates in {result.wall_s:.1f} s "
        f"({result.env_steps_per_s:.0f} steps/s){solved}\n"
        + (f"time: {result.verdict} (`qfleet inspect` for the split)\n" if result.verdict
           else "") + f"run directory: {_escape(result.run_dir)}", highlight=False)


def cmd_presets(args: argparse.Namespace) -> int:
    from qfleet.algos import scheme_row
    from qfleet.config import load_config, preset_names

    out, _ = _consoles()
    width = max(map(len, preset_names()))
    for name in preset_names():
        cfg = load_config(name)
        row = " · ".join(f"{k}: {v}" for k, v in scheme_row(cfg).items())
        out.print(f"[bold]{name:<{width}}[/] {_escape(cfg.description)}\n"
                  f"{'':<{width}} [dim]{_escape(row)}[/]", highlight=False)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from qfleet.config import load_config, resolve_source, to_toml

    cfg = load_config(args.preset, args.set or [])
    sys.stdout.write(f"# resolved from {resolve_source(args.preset)}\n"
                     + to_toml(cfg, explain=args.explain))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qfleet.policy_io import load_policy

    policy = load_policy(args.path)
    net, cfg = policy.net, policy.config
    out, _ = _consoles()
    if args.video:
        from qfleet.evaluate import record_video

        res = record_video(net, cfg.env, args.episodes, cfg.seed, Path(args.video))
        out.print(f"videos written to {_escape(args.video)}")
    else:
        from qfleet.evaluate import evaluate

        res = evaluate(net, cfg.env, args.episodes, cfg.seed, epsilon=cfg.train.eval_epsilon)
    out.print(f"eval return {res.mean:.1f} ± {res.std:.1f} over {len(res.returns)} episodes "
              f"({_escape(cfg.env.id)})", highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qfleet.export import FORMATS, export_policy
    from qfleet.hub import run_dir_of
    from qfleet.policy_io import load_policy

    policy = load_policy(args.path, device="cpu")
    folder = run_dir_of(policy.source) or Path(args.path)
    target = Path(args.output) if args.output else \
        folder / "export" / f"policy{FORMATS[args.format]}"
    check = export_policy(policy, args.format, target)
    _consoles()[0].print(
        f"{args.format} model written to {_escape(check.path)}; it matches PyTorch on "
        f"{check.observations} observations (max |diff| {check.max_abs_diff:.2g}). "
        "Input 'obs' (batch, *observation shape); outputs 'action', 'values'.", highlight=False)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from qfleet import hub
    from qfleet.policy_io import load_policy

    hub.check_repo_id(args.repo)
    if not args.no_upload:
        hub.check_installed()  # before the minutes a video can take
    policy = load_policy(args.path, device="cpu")
    folder = Path(args.output) if args.output else \
        (hub.run_dir_of(policy.source) or Path(args.path)) / "hub"
    hub.prepare(policy, args.repo, folder, video=not args.no_video)
    out, _ = _consoles()
    out.print(f"Hub folder prepared: {_escape(folder)}", highlight=False)
    if not args.no_upload:
        url = hub.upload(folder, args.repo, private=args.private)
        out.print(f"uploaded to {_escape(url)}", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfleet", description=__doc__)
    parser.add_argument("--version", action=Version, help="print the version and exit")
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
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    seeds.add_argument("--seeds", type=seed_list, metavar="N,N,...",
                       help="one run per seed, one after the other, in RUN_DIR/seed-N")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --run-dir (its checkpoints are deleted)")

    add("presets", cmd_presets, "list the presets")

    p = add("config", cmd_config, "print a preset's fully resolved TOML")
    p.add_argument("preset", help="preset name or path.toml")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--explain", action="store_true",
                   help="precede every field with its help text and allowed values")

    p = add("eval", cmd_eval, "evaluate a run's latest checkpoint greedily")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--episodes", type=positive, default=20)
    p.add_argument("--video", metavar="DIR", help="record episodes (needs rgb_array rendering)")

    p = add("resume", cmd_resume, "continue a run from its latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a field, e.g. train.total_env_steps=100000")

    _add_policy_commands(add)
    add_insight_commands(add)

    return parser


def _add_policy_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The commands that take a trained policy out of qfleet."""
    p = add("export", cmd_export, "write a run's policy as a standalone ONNX or TorchScript "
            "model, checked against PyTorch")
    p.add_argument("path", help="run directory, checkpoint directory or pushed folder")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("-o", "--output", help="the file to write (default RUN/export/policy.EXT)")

    p = add("push", cmd_push, "prepare a Hugging Face Hub folder for a run's policy "
            "(weights, config, score, video, model card) and upload it")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the Hub repository")
    p.add_argument("-o", "--output", help="the folder to prepare (default RUN/hub)")
    p.add_argument("--no-upload", action="store_true", help="only prepare the folder")
    p.add_argument("--no-video", action="store_true", help="skip the replay video")
    p.add_argument("--private", action="store_true", help="create the repository private")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # env.id = "my_envs:Corridor" and env.wrappers find a module in the current folder, as
    # with `python -m qfleet`; appended, so it never shadows an installed package.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        # NumPy first: torch's C extension imports it during its own init and swallows
        # any error there, a Ctrl-C (KeyboardInterrupt) included.
        import numpy  # noqa: F401
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args))
    except BaseException as err:  # every failure ends here, as one line where it can
        return _report(err, args)


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    from qfleet.config import QfleetWarning

    if issubclass(category, QfleetWarning):
        _consoles()[1].print(f"qfleet: warning: {_escape(message)}", highlight=False)
    else:
        print(f"{category.__name__}: {message}", file=sys.stderr)


def _report(err: BaseException, args: argparse.Namespace) -> int:
    """The error boundary: a user-caused failure is one line and exit 2; a broken run is
    one line and exit 1; a bug keeps its traceback (exit 1); Ctrl-C exits 128 + signal."""
    if isinstance(err, KeyboardInterrupt):
        return _interrupted(err, args)
    if isinstance(err, SystemExit):
        raise err
    line, code = _user_error(err)
    _, errs = _consoles()
    if line is not None:
        errs.print(f"[bold red]qfleet: error:[/] {_escape(line)}", highlight=False)
        return code
    import traceback

    traceback.print_exception(err)
    hint = _resume_hint(args)
    errs.print(f"[bold red]qfleet: {args.command} failed (a bug, please report it):[/] "
               f"{type(err).__name__}: {_escape(err)}." + (f" {hint}" if hint else ""),
               highlight=False)
    return 1


def _user_error(err: BaseException) -> tuple[str | None, int]:
    """(the one line to print, the exit code), or (None, 1) for a bug."""
    from qfleet.checkpoint import CheckpointError
    from qfleet.config import ConfigError
    from qfleet.errors import QfleetFailure

    if isinstance(err, (ConfigError, CheckpointError)):
        return str(err), 2
    if isinstance(err, QfleetFailure):
        return str(err), 1
    if isinstance(err, OSError) and err.errno in USER_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}", 2
    if isinstance(err, MemoryError):
        return ("out of memory: lower replay.capacity, net.hidden, actors.count or "
                "env.num_envs"), 2
    from qfleet.experiment import Diverged
    from qfleet.runtime.errors import WorkerError

    if isinstance(err, WorkerError):  # the worker's own traceback is in the message
        return f"a worker failed, run stopped: {err}", 1
    if isinstance(err, Diverged):
        return str(err), 1
    return None, 1


def _resume_hint(args: argparse.Namespace) -> str:
    """Where a failed train/resume can continue from, if a checkpoint exists."""
    run_dir = getattr(args, "resolved_run_dir", None)
    checkpoint = sys.modules.get("qfleet.checkpoint")  # not loaded: nothing was saved
    if run_dir is None or checkpoint is None:
        return ""
    found = checkpoint.candidates(run_dir)
    if not found:
        return ""
    return (f"Workers were stopped; the last checkpoint is {found[0]} "
            f"(continue with `qfleet resume {run_dir}`).")


def _interrupted(err: KeyboardInterrupt, args: argparse.Namespace) -> int:
    # Nothing is imported here that a Ctrl-C could have cut off halfway (torch, ...).
    experiment = sys.modules.get("qfleet.experiment")
    _, errs = _consoles()
    if experiment is not None and isinstance(err, experiment.Interrupted):
        errs.print(f"interrupted ({_escape(err)}); continue with: qfleet resume "
                   f"{_escape(err.checkpoint.parent.parent)}", highlight=False)
        return err.exit_code
    hint = _resume_hint(args)
    errs.print("interrupted" + (f"; {hint}" if hint else ""), highlight=False)
    return 130
