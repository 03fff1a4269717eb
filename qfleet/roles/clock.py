"""Where a role's time goes: ``lap(name)`` charges the time since the previous lap to
``name``. One ``perf_counter`` call and one dict update per lap, so roles lap a few times
per chunk or update and the run reports its split (``qfleet.timesplit``)."""

from __future__ import annotations

import time


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def take(self) -> dict[str, float]:
        """The seconds charged since the last take (the clock keeps running)."""
        out, self.seconds = self.seconds, {}
        return out


class NullClock(Clock):
    """Measures nothing: what the accounting costs is the difference (a benchmark's)."""

    def lap(self, name: str) -> None:
        pass
