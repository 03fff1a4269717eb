"""Errors and limits every backend shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qfleet.runtime.base import RoundReport

MAX_RESTARTS = 20  # per worker slot: past this a crash loop is a bug to report, not retry


class WorkerError(RuntimeError):
    """A worker (actor, gradient worker, shard, learner actor) raised or could not go on;
    carries the worker's own traceback when there is one."""


def count_restart(restarts: list[int], i: int, role: str, cause: str,
                  report: RoundReport) -> None:
    """Count a restart of worker slot ``i`` (a process or node lost, on any backend); past
    MAX_RESTARTS a crash loop is an error to report, not to retry."""
    restarts[i] += 1
    if restarts[i] > MAX_RESTARTS:
        raise WorkerError(f"{role} {i} was lost {restarts[i]} times (last: {cause}); "
                          "giving up")
    report.actor_restarts += 1
    report.notes.append(f"{role} {i} lost ({cause}); restarting it with fresh seeds")
