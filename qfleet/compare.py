"""``qfleet compare``: several configurations on one budget, each over the same seeds, then one
self-contained report (report.html with the figures embedded, plus the PNGs).

A source is a preset, a TOML file, or a run directory already trained (one run, or a folder of
``seed-N`` runs): those are only read, so a report can be redrawn without training again.
Runs go to ``OUT/runs/NAME/seed-N``; one that finished is kept, one that was cut short is
resumed from its checkpoint, so a compare that was interrupted continues where it stopped.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qfleet.config import Config, ConfigError, load_config, to_toml
from qfleet.errors import QfleetFailure
from qfleet.metrics import read_metrics
from qfleet.plots import expand, plot_runs
from qfleet.rundir import seed_dir
from qfleet.timesplit import short


@dataclass
class Entry:
    """One configuration in the comparison and its runs (one per seed)."""

    name: str
    runs: list[Path]
    configs: list[Config] = field(default_factory=list)  # to train; empty: given as runs


def is_run_source(source: str) -> bool:
    """A trained run, or a folder of seed-N runs (what ``expand`` opens)."""
    path = Path(source)
    return path.is_dir() and any((p / "metrics.jsonl").is_file() for p in expand([path]))


def run(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[Path, list[str],
                                                                    list[list[str]]]:
    """The ``qfleet compare`` command: plan, train what is missing, write the report;
    returns the report's path and its table (headers, rows)."""
    out = Path(args.output or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    sets = list(args.set or [])
    if args.budget_steps:
        sets.append(f"train.total_env_steps={args.budget_steps}")
    if args.budget_s:
        sets.append(f"train.max_wall_s={args.budget_s}")
    entries = plan(args.sources, list(range(args.seeds)), sets, out)
    train_missing(entries, say, args.jobs)
    threshold = args.threshold if args.threshold is not None else common_threshold(entries)
    rows = table(entries, threshold)
    return write_report(entries, out, threshold, rows), headers(threshold), rows


def plan(sources: list[str], seeds: list[int], overrides: list[str], out: Path) -> list[Entry]:
    """Every source as an entry; configs (validated now, before any training) get one run
    per seed under ``out/runs``."""
    entries: list[Entry] = []
    for stem, source, own in (item for s in sources for item in _expand_source(s)):
        given = own is None
        name, k = stem, 1
        while name in {e.name for e in entries}:  # the same preset twice: name-1, name-2
            name, k = f"{stem}-{k}", k + 1
        if given:
            entries.append(Entry(name, expand([Path(source)])))
            continue
        cfgs = [load_config(source, [*overrides, *(own or []), f"seed={seed}"])
                for seed in seeds]
        entries.append(Entry(name, [seed_dir(out / "runs" / name, s) for s in seeds], cfgs))
    return entries


def _expand_source(source: str) -> list[tuple[str, str, list[str] | None]]:
    """(name, config, its own overrides) for each config a source stands for: a preset or a
    config TOML is one, a plan TOML (``[[run]]`` tables) is each of its runs; a trained
    run dir has None for overrides (nothing to train)."""
    if is_run_source(source):
        return [(Path(source).name, source, None)]
    path = Path(source)
    data = tomllib.loads(path.read_text()) if path.suffix == ".toml" and path.is_file() else {}
    if "run" not in data:
        return [(path.stem, source, [])]
    runs = data["run"]
    if set(data) != {"run"} or not isinstance(runs, list) or not runs:
        raise ConfigError(f"{source}: a compare plan holds only [[run]] tables (each with "
                          "config, and optionally name and set); found " + ", ".join(data))
    return [_plan_run(source, k, run) for k, run in enumerate(runs)]


def _plan_run(source: str, k: int, run: Any) -> tuple[str, str, list[str]]:
    where = f"{source}: run {k + 1}"
    allowed = {"config": str, "name": str, "set": list}
    if not isinstance(run, dict) or "config" not in run:
        raise ConfigError(f"{where}: needs config = \"PRESET or path.toml\"")
    for key, value in run.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: config, name, set")
        if not isinstance(value, allowed[key]) or \
                (key == "set" and not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: {key} = {value!r} must be a "
                              + ("list of 'section.key=value' strings" if key == "set"
                                 else "string"))
    config = str(Path(source).parent / run["config"]) \
        if run["config"].endswith(".toml") else run["config"]  # beside the plan
    return run.get("name", Path(run["config"]).stem), config, list(run.get("set", []))


Job = tuple[Entry, Path, Config]  # a run of the plan still to train


def train_missing(entries: list[Entry], say: Callable[[str], None], jobs: int = 1) -> None:
    """Train every run of the plan that has not finished: one at a time in this process,
    or ``jobs`` at once, each in its own ``qfleet`` process."""
    todo = [(e, run, cfg) for e in entries  # entries given as runs have no configs
            for run, cfg in zip(e.runs, e.configs, strict=False)
            if not (run / "result.json").is_file()]
    if jobs > 1 and len(todo) > 1:
        _train_at_once(todo, jobs, say)
    else:
        _train_in_turn(todo, say)


def _train_in_turn(todo: list[Job], say: Callable[[str], None]) -> None:
    from qfleet import checkpoint
    from qfleet.experiment import resume, train

    for k, (entry, run, cfg) in enumerate(todo, start=1):
        say(f"compare: {entry.name} seed {cfg.seed} ({k}/{len(todo)}) -> {run}")
        if checkpoint.candidates(run):
            resume(run)
        else:
            train(cfg, run, overwrite=run.exists())


def _command(run: Path, cfg: Config) -> list[str]:
    """The command line that trains one run of the plan (resumes it if it was cut short)."""
    from qfleet import checkpoint

    qfleet = [sys.executable, "-m", "qfleet"]
    if checkpoint.candidates(run):
        return [*qfleet, "resume", str(run)]
    spec = run.parent / f"{run.name}.toml"  # the config exactly as planned and validated
    spec.write_text(to_toml(cfg))
    return [*qfleet, "train", str(spec), "--run-dir", str(run), "--overwrite"]


def _train_at_once(todo: list[Job], jobs: int, say: Callable[[str], None]) -> None:
    """Up to ``jobs`` runs at a time, each a child process writing RUN.log beside its run.
    A failed run does not stop the others; they all end before the error names it. If this
    process stops (Ctrl-C), the children are interrupted too, so each keeps a checkpoint."""
    waiting, failed = list(todo), []
    running: dict[subprocess.Popen[bytes], tuple[str, Path]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                entry, run, cfg = waiting.pop(0)
                run.parent.mkdir(parents=True, exist_ok=True)
                log = run.parent / f"{run.name}.log"
                with log.open("w") as sink:
                    child = subprocess.Popen(_command(run, cfg), stdout=sink,
                                             stderr=subprocess.STDOUT)
                running[child] = (f"{entry.name} seed {cfg.seed}", log)
                say(f"compare: {entry.name} seed {cfg.seed} started -> {run} (log: {log})")
            time.sleep(0.2)
            for child in [c for c in running if c.poll() is not None]:
                what, log = running.pop(child)
                say(f"compare: {what} " + ("done" if child.returncode == 0 else
                                           f"failed (exit code {child.returncode})"))
                if child.returncode != 0:
                    failed.append(f"{what} (exit code {child.returncode}; see {log})")
    finally:
        _interrupt(list(running))
    if failed:
        raise QfleetFailure(f"compare: {len(failed)} of {len(todo)} runs failed: "
                            + "; ".join(failed) + ". Run compare again to retry them")


def _interrupt(children: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C each child still running (it checkpoints), and kill any that will not end."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    for child in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _time_to(records: list[dict[str, Any]], threshold: float) -> tuple[float, float] | None:
    """(env steps, wall s) of the first greedy eval at or above ``threshold``."""
    for r in records:
        if r.get("event") == "eval" and float(r.get("eval_return_mean", -np.inf)) >= threshold:
            return float(r["env_steps"]), float(r["wall_s"])
    return None


def summarize(entry: Entry, threshold: float | None) -> dict[str, Any]:
    """One row of the table: means over the entry's seeds."""
    results = [json.loads((run / "result.json").read_text()) for run in entry.runs
               if (run / "result.json").is_file()]
    finals = [r["eval_return_mean"] for r in results]
    row: dict[str, Any] = {
        "name": entry.name, "seeds": len(entry.runs), "finished": len(results),
        "final": (float(np.mean(finals)), float(np.std(finals))) if finals else None,
        "steps_per_s": float(np.mean([r["env_steps_per_s"] for r in results]))
        if results else None,
        "updates_per_s": float(np.mean([r["updates"] / r["wall_s"] for r in results
                                        if r["wall_s"] > 0])) if results else None,
        "verdicts": [r["verdict"] for r in results if r.get("verdict")]}
    if threshold is not None:
        hits = [t for run in entry.runs if (t := _time_to(read_metrics(run), threshold))]
        row["reached"] = len(hits)
        row["to_threshold"] = (float(np.mean([h[0] for h in hits])),
                               float(np.mean([h[1] for h in hits]))) if hits else None
    return row


def common_threshold(entries: list[Entry]) -> float | None:
    """The configs' train.target_return when they all share one, else None."""
    targets = set()
    for run in (r for e in entries for r in e.runs):
        try:
            targets.add(tomllib.loads((run / "config.toml").read_text())
                        .get("train", {}).get("target_return"))
        except (OSError, ValueError):
            return None
    return targets.pop() if len(targets) == 1 else None


def _cells(row: dict[str, Any], threshold: float | None) -> list[str]:
    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    final = row["final"]
    cells = [row["name"], f"{row['finished']}/{row['seeds']}",
             "–" if final is None else f"{final[0]:.1f} ± {final[1]:.1f}"]
    if threshold is not None:
        steps, secs = row["to_threshold"] or (None, None)
        cells += [f"{row['reached']}/{row['seeds']}", num(steps, ",.0f"), num(secs, ".1f")]
    kinds = sorted({short(v) for v in row["verdicts"]})  # seeds may disagree: all of them
    return [*cells, num(row["steps_per_s"], ",.0f"), num(row["updates_per_s"], ",.1f"),
            " / ".join(kinds) or "–"]


def headers(threshold: float | None) -> list[str]:
    middle = [] if threshold is None else [
        f"reached {threshold:g}", f"steps to {threshold:g}", f"s to {threshold:g}"]
    return ["config", "seeds", "final return", *middle, "env steps/s", "updates/s",
            "time verdict"]


def table(entries: list[Entry], threshold: float | None) -> list[list[str]]:
    """The report's table as text cells, one row per entry (means over seeds that reached)."""
    return [_cells(summarize(e, threshold), threshold) for e in entries]


def write_report(entries: list[Entry], out: Path, threshold: float | None,
                 rows: list[list[str]]) -> Path:
    """out/report.html (figures embedded: it opens from disk, alone), the figures as PNGs,
    and the table (``rows``, from ``table``) as summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for e in entries for r in e.runs if (r / "metrics.jsonl").is_file()]
    if not runs:
        raise ConfigError("nothing to compare: no run has written metrics yet")
    figures = [(plot_runs(runs, out / f"return_vs_{x}.png", x_axes=(x,)), caption)
               for x, caption in (("steps", "greedy eval return vs environment steps"),
                                  ("wall", "greedy eval return vs wall time"))]
    (out / "summary.json").write_text(json.dumps(
        {"threshold": threshold, "headers": headers(threshold), "rows": rows}, indent=2))
    page = _html(figures, headers(threshold), rows, threshold, _verdicts(entries))
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


def _html(figures: list[tuple[Path, str]], head: list[str], rows: list[list[str]],
          threshold: float | None, below: str) -> str:
    imgs = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)} '
        f'(mean ± std band over seeds)</figcaption></figure>' for path, caption in figures)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                  for row in rows)
    note = "" if threshold is None else \
        f"<p>Final return: the last greedy eval, mean ± std over seeds. Env steps and " \
        f"seconds to {threshold:g}: means over the seeds that reached it.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>qfleet compare</title>"
            f"<style>{_CSS}</style></head><body><h1>qfleet compare</h1>{imgs}"
            f"<table id='summary'><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
            f"{note}{below}</body></html>\n")


def _verdicts(entries: list[Entry]) -> str:
    """Each run's whole time verdict (the table has its first words)."""
    items = []
    for entry in entries:
        for run in entry.runs:
            if (run / "result.json").is_file():
                said = json.loads((run / "result.json").read_text()).get("verdict") or "–"
                items.append(f"<li><b>{html.escape(entry.name)}</b> {html.escape(run.name)}: "
                             f"{html.escape(said)}</li>")
    return f"<h2>Where the time went</h2><ul id='verdicts'>{''.join(items)}</ul>"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:80em}img{max-width:100%}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}")
