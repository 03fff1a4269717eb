"""How a run stops when it cannot go on by itself: Ctrl-C or SIGTERM (``StopFlag``), and
the stall watchdog (``runtime.stall_timeout_s``): a run that stops moving says what
stopped and where it is stuck, and ends with an error instead of hanging.

A run stalls in one of two ways. A round that never returns (an inline env that blocks,
a learner stuck in a call): SIGALRM, armed around each round, dumps this process's stacks
and raises ``Stalled``. Rounds that return but bring nothing: the watch adds up round time
since each worker's last arrival and since the last env step or update, and names the
silent workers; the backend has each of them print its own stack (``dump_stacks``). Only
time inside rounds counts, so evals and checkpoints between rounds never look like one.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.errors import QfleetFailure
from qfleet.runtime.base import RoundReport


class Stalled(QfleetFailure):
    """Nothing moved for ``runtime.stall_timeout_s``: the message names what stopped."""


def workers_of(program: ActorLearnerProgram | GradientProgram) -> tuple[int, str]:
    """(how many workers send data, what they are called) for the watch's messages."""
    if isinstance(program, GradientProgram):
        return program.num_workers, "worker"
    return program.num_actors, "actor"


class StallWatch:
    def __init__(self, timeout_s: float, workers: int, role: str) -> None:
        self.timeout_s, self.role = timeout_s, role
        self.active = False  # inside ``guarded``: SIGALRM is ours
        self.quiet_s = 0.0  # round time since the last env step or update
        self.silent_s = [0.0] * workers  # round time since each worker's last arrival

    def after_round(self, report: RoundReport, round_s: float) -> list[int]:
        """Count one round; the silent workers if the run stalled, else []."""
        if not self.timeout_s:
            return []
        self.quiet_s = 0.0 if report.env_steps or report.updates else self.quiet_s + round_s
        for i, silent_s in enumerate(self.silent_s):
            self.silent_s[i] = 0.0 if i in report.steps_by_actor else silent_s + round_s
        silent = [i for i, s in enumerate(self.silent_s) if s > self.timeout_s]
        if silent or self.quiet_s > self.timeout_s:
            return silent or list(range(len(self.silent_s)))
        return []

    def message(self, silent: list[int]) -> str:
        names = ", ".join(f"{self.role} {i}" for i in silent)
        if self.quiet_s > self.timeout_s:
            return (f"stalled: no env step and no update for {self.quiet_s:.0f} s "
                    f"(runtime.stall_timeout_s = {self.timeout_s:g}); nothing arrived "
                    f"from {names}")
        others = "" if len(silent) == len(self.silent_s) else " while the others went on"
        return (f"stalled: {names} sent nothing for {max(self.silent_s):.0f} s{others} "
                f"(runtime.stall_timeout_s = {self.timeout_s:g})")

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """For the run: SIGALRM raises Stalled from a round that outlives the timeout
        (the main thread only: only it receives signals)."""
        if not self.timeout_s or threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.signal(signal.SIGALRM, self._alarm)
        self.active = True
        try:
            yield
        finally:
            self.active = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def arm(self, on: bool) -> None:
        """Around a round: on before it, off after (no-ops outside ``guarded``)."""
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s if on else 0)

    def _alarm(self, signum: int, frame: FrameType | None) -> Any:
        print(f"qfleet: a round has not returned for {self.timeout_s:g} s; where this "
              "process is:", file=sys.stderr)
        for thread_id, thread_frame in sys._current_frames().items():
            print(f"Thread {thread_id:#x} (most recent call last):", file=sys.stderr)
            traceback.print_stack(thread_frame, file=sys.stderr)
        sys.stderr.flush()
        raise Stalled(f"stalled: one round of the run has not returned for "
                      f"{self.timeout_s:g} s (runtime.stall_timeout_s); the stack printed "
                      "above shows where this process is stuck")


class StopFlag:
    """First Ctrl-C/SIGTERM asks the loop to stop after the current round (a safe point to
    checkpoint); a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def install_handlers(stop: StopFlag) -> dict[int, Any]:
    """Route SIGINT/SIGTERM to ``stop``; only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
