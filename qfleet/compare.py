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
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qfleet.config import Config, ConfigError, load_config
from qfleet.metrics import read_metrics
from qfleet.plots import expand, plot_runs
from qfleet.rundir import seed_dir


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
    entries = plan(args.sources, list(range(args.seeds)), sets, out)
    train_missing(entries, say)
    threshold = args.threshold if args.threshold is not None else common_threshold(entries)
    rows = table(entries, threshold)
    return write_report(entries, out, threshold, rows), headers(threshold), rows


def plan(sources: list[str], seeds: list[int], overrides: list[str], out: Path) -> list[Entry]:
    """Every source as an entry; configs (validated now, before any training) get one run
    per seed under ``out/runs``."""
    entries: list[Entry] = []
    for source in sources:
        given = is_run_source(source)
        name = stem = Path(source).name if given else Path(source).stem
        k = 1
        while name in {e.name for e in entries}:  # the same preset twice: name-1, name-2
            name, k = f"{stem}-{k}", k + 1
        if given:
            entries.append(Entry(name, expand([Path(source)])))
            continue
        cfgs = [load_config(source, [*overrides, f"seed={seed}"]) for seed in seeds]
        entries.append(Entry(name, [seed_dir(out / "runs" / name, s) for s in seeds], cfgs))
    return entries


def train_missing(entries: list[Entry], say: Callable[[str], None]) -> None:
    """Train, one at a time, every run of the plan that has not finished."""
    from qfleet import checkpoint
    from qfleet.experiment import resume, train

    todo = [(e, run, cfg) for e in entries  # entries given as runs have no configs
            for run, cfg in zip(e.runs, e.configs, strict=False)
            if not (run / "result.json").is_file()]
    for k, (entry, run, cfg) in enumerate(todo, start=1):
        say(f"compare: {entry.name} seed {cfg.seed} ({k}/{len(todo)}) -> {run}")
        if checkpoint.candidates(run):
            resume(run)
        else:
            train(cfg, run, overwrite=run.exists())


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
                                        if r["wall_s"] > 0])) if results else None}
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
    return [*cells, num(row["steps_per_s"], ",.0f"), num(row["updates_per_s"], ",.1f")]


def headers(threshold: float | None) -> list[str]:
    middle = [] if threshold is None else [
        f"reached {threshold:g}", f"steps to {threshold:g}", f"s to {threshold:g}"]
    return ["config", "seeds", "final return", *middle, "env steps/s", "updates/s"]


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
    page = _html(figures, headers(threshold), rows, threshold)
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


def _html(figures: list[tuple[Path, str]], head: list[str], rows: list[list[str]],
          threshold: float | None) -> str:
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
            f"{note}</body></html>\n")


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:80em}img{max-width:100%}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}")
