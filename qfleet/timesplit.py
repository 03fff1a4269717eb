"""Where a run's time goes, by role, and the one-line verdict on what holds it back.

Roles keep ``Clock``s and their rounds report seconds as "role.activity": actors
(``waiting``: for the learner to take their chunk; ``params``, ``inference``, ``env``,
``other``), gradient workers (the same, plus ``learn``; in a sync group without a
server, ``sync`` for the others' gradients and ``apply`` for the replica's step), the
learner (``wait`` for data, ``ingest``, ``sample``, ``update``, ``priorities``,
``publish``; inline, ``actors``) and the aggregator (``wait``, ``apply``; inline,
``workers``). A side that waits ``WAIT`` of its time or more is held up by the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WAIT = 0.3
PRODUCER = {"learner": "actor", "aggregator": "worker"}  # who feeds whom


def add_times(total: dict[str, float], times: Iterable[tuple[str, float]]) -> None:
    for key, seconds in times:
        total[key] = total.get(key, 0.0) + seconds


def window_times(reports: Iterable[Any]) -> dict[str, float]:
    """The seconds of several rounds' reports (RoundReport.times) together."""
    total: dict[str, float] = {}
    for report in reports:
        add_times(total, report.times.items())
    return total


def fractions(times: dict[str, float]) -> dict[str, float]:
    """Each "role.activity"'s share of its role's time (summed over that role's workers)."""
    totals: dict[str, float] = {}
    for key, seconds in times.items():
        role = key.split(".")[0]
        totals[role] = totals.get(role, 0.0) + seconds
    return {key: seconds / totals[key.split(".")[0]] for key, seconds in sorted(times.items())
            if totals[key.split(".")[0]] > 0}


def verdict(share: dict[str, float]) -> str:
    """One sentence: which side holds the run back, or where the time goes."""
    consumer = "aggregator" if any(k.startswith("aggregator.") for k in share) else "learner"
    producer = PRODUCER[consumer]
    if f"{consumer}.{producer}s" in share:  # one process: nobody waits, time is shared
        return "one process: " + _top(share, consumer)
    fed_wait = share.get(f"{producer}.waiting", 0.0)
    feeder_wait = share.get(f"{consumer}.wait", 0.0)
    if fed_wait >= WAIT and feeder_wait >= WAIT:  # a relay: each waits for the other
        return (f"hand-off-bound: {producer}s waited {fed_wait:.0%} of their time and the "
                f"{consumer} {feeder_wait:.0%} of its: passing data and parameters between "
                "them costs more than either side's work")
    if fed_wait >= WAIT:
        return (f"{consumer}-bound: {producer}s waited {fed_wait:.0%} of their time for "
                f"the {consumer} to take their data")
    if feeder_wait >= WAIT:
        return f"{producer}-bound: the {consumer} waited {feeder_wait:.0%} of its time for data"
    return f"balanced: {producer}s {_top(share, producer)}; {consumer} {_top(share, consumer)}"


def _top(share: dict[str, float], role: str, count: int = 3) -> str:
    mine = sorted(((v, k.split(".", 1)[1]) for k, v in share.items()
                   if k.startswith(f"{role}.") and v >= 0.01), reverse=True)
    return ", ".join(f"{name} {v:.0%}" for v, name in mine[:count]) or "no time measured"


def split_record(window: dict[str, float], total: dict[str, float]) -> dict[str, Any]:
    """For a metrics line: the window's shares and verdict, and the run's seconds so far."""
    share = fractions(window)
    return {"time_split": {k: round(v, 4) for k, v in share.items()},
            "verdict": verdict(share) if share else None,
            "time_s": {k: round(v, 3) for k, v in total.items()}}


def short(text: str) -> str:
    """The verdict's first words, for the progress line."""
    return text.split(":")[0]
