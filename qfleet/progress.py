"""A live progress line (rich) on a terminal; plain periodic lines elsewhere (CI, pipes)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from qfleet.timesplit import short


def _fmt(stats: dict[str, Any]) -> str:
    parts = [f"{stats['env_steps']:>8,} steps", f"{stats['env_steps_per_s']:7.0f} steps/s"]
    if stats.get("return_mean") is not None:
        parts.append(f"return {stats['return_mean']:7.1f}")
    if stats.get("eval_return_mean") is not None:
        parts.append(f"eval {stats['eval_return_mean']:6.1f}")
    if stats.get("epsilon") is not None:
        parts.append(f"eps {stats['epsilon']:.3f}")
    if stats.get("loss") is not None:
        parts.append(f"loss {stats['loss']:.4f}")
    if stats.get("verdict"):
        parts.append(short(stats["verdict"]))
    return "  ".join(parts)


class ProgressLine:
    def __init__(self, total: int, enabled: bool, start: int = 0) -> None:
        self.console = Console(stderr=True, soft_wrap=True)
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.total = total
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                     TimeRemainingColumn(), console=self.console,
                                     transient=False)
            self.task = self.progress.add_task("starting", total=total, completed=start)
            self.progress.start()

    def update(self, stats: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=stats["env_steps"], description=_fmt(stats))
        elif self.enabled:
            left = (self.total - stats["env_steps"]) / max(stats["env_steps_per_s"], 1e-9)
            self.console.print(f"{_fmt(stats)}  ETA {left:5.0f}s", highlight=False)

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
