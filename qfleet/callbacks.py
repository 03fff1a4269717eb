"""Callbacks: watch, stop or prune a run from Python (``qfleet.train(cfg, callbacks=[...])``).

Every hook is called in the main process (the one that called train), whatever the backend:
the experiment loop that logs, evaluates and checkpoints runs there. A callback is any
object with some of these methods; subclass ``Callback`` to get no-op defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class Callback:
    def on_metrics(self, event: str, record: dict[str, Any]) -> None:
        """Every record written to metrics.jsonl (``event`` is "train" or "eval"); each
        has ``env_steps`` and ``wall_s``."""

    def on_eval(self, record: dict[str, Any]) -> bool | None:
        """After each greedy evaluation (``record["eval_return_mean"]``, ...). Return True to
        stop the run: it finishes as if its budget were spent (final eval, checkpoint,
        result.json). Raising stops it at once (workers are shut down, the error propagates)."""
        return None

    def on_checkpoint(self, path: Path) -> None:
        """After a checkpoint folder was written (periodic, on Ctrl-C, and the final one)."""


class CallbackList:
    """Calls every callback's hook that it has, in order; remembers a request to stop."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)
        self.stop_requested = False
        for cb in self.callbacks:
            if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
                raise TypeError(f"callback {cb!r} has none of the hooks {', '.join(HOOKS)}")

    def metrics(self, event: str, record: dict[str, Any]) -> None:
        for cb in self._with("on_metrics"):
            cb.on_metrics(event, dict(record))

    def eval(self, record: dict[str, Any]) -> None:
        for cb in self._with("on_eval"):
            if cb.on_eval(dict(record)):
                self.stop_requested = True

    def checkpoint(self, path: Path) -> None:
        for cb in self._with("on_checkpoint"):
            cb.on_checkpoint(path)

    def _with(self, hook: str) -> list[Any]:
        return [cb for cb in self.callbacks if callable(getattr(cb, hook, None))]


HOOKS = ("on_metrics", "on_eval", "on_checkpoint")
