"""Algorithms: one module per row of DESIGN.md's table, each wiring roles from a config."""

from __future__ import annotations

from qfleet.algos import apex, dqn
from qfleet.algos.program import ActorLearnerProgram, Schedule
from qfleet.config import Config, ConfigError

BUILDERS = {"dqn": dqn.build, "apex": apex.build}

__all__ = ["ActorLearnerProgram", "Schedule", "build_program"]


def build_program(cfg: Config) -> ActorLearnerProgram:
    try:
        builder = BUILDERS[cfg.algo.name]
    except KeyError:
        raise ConfigError(f"algo.name = {cfg.algo.name!r}: allowed: {', '.join(BUILDERS)}") \
            from None
    return builder(cfg)
