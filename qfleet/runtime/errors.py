"""Errors and limits every backend shares."""

from __future__ import annotations

MAX_RESTARTS = 20  # per worker slot: past this a crash loop is a bug to report, not retry


class WorkerError(RuntimeError):
    """A worker (actor, gradient worker, shard, learner actor) raised or could not go on;
    carries the worker's own traceback when there is one."""
