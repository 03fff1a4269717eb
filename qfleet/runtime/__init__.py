"""Backends: place roles and move data between them; they never import a loss."""

from __future__ import annotations

from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import ConfigError
from qfleet.runtime.base import LearnerSide, RoundReport
from qfleet.runtime.inline import InlineRunner
from qfleet.runtime.processes import ProcessesRunner, WorkerError

Runner = InlineRunner | ProcessesRunner

__all__ = ["InlineRunner", "LearnerSide", "ProcessesRunner", "RoundReport", "Runner",
           "WorkerError", "make_runner"]


def make_runner(backend: str, program: ActorLearnerProgram) -> Runner:
    if backend == "inline":
        return InlineRunner(program)
    if backend == "processes":
        return ProcessesRunner(program)
    raise ConfigError(f"runtime.backend = {backend!r}: allowed: 'inline', 'processes'")
