"""Backends: place roles and move data between them; they never import a loss."""

from __future__ import annotations

from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import ConfigError
from qfleet.runtime.base import RoundReport
from qfleet.runtime.inline import InlineRunner

__all__ = ["InlineRunner", "RoundReport", "make_runner"]


def make_runner(backend: str, program: ActorLearnerProgram) -> InlineRunner:
    if backend == "inline":
        return InlineRunner(program)
    raise ConfigError(f"runtime.backend = {backend!r}: allowed: 'inline'")
