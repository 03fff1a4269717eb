"""Algorithms: one module per row of DESIGN.md's table, each wiring roles from a config."""

from __future__ import annotations

from qfleet.algos import apex, dqn
from qfleet.algos.program import ActorLearnerProgram, Schedule
from qfleet.config import Config, ConfigError

BUILDERS = {"dqn": dqn.build, "apex": apex.build}

__all__ = ["ActorLearnerProgram", "Schedule", "build_program", "scheme_row"]


def scheme_row(cfg: Config) -> dict[str, str]:
    """The preset's row of DESIGN.md's table: loss, data path, aggregation, backend."""
    if cfg.algo.name == "apex":
        data = f"sharded prioritized replay ({cfg.actors.count} shards, actor priorities)"
    elif cfg.replay.kind == "prioritized":
        data = "prioritized replay" + (f" ({cfg.replay.shards} shards)"
                                       if cfg.replay.shards > 1 else "")
    else:
        data = "uniform replay"
    loss = "DQN" + (" double" if cfg.algo.double else "") + \
        (f" {cfg.algo.n_step}-step" if cfg.algo.n_step > 1 else "") + \
        (" dueling" if cfg.net.dueling else "")
    return {"loss": loss, "data path": data, "aggregation": "single learner",
            "backend": cfg.runtime.backend}


def build_program(cfg: Config) -> ActorLearnerProgram:
    try:
        builder = BUILDERS[cfg.algo.name]
    except KeyError:
        raise ConfigError(f"algo.name = {cfg.algo.name!r}: allowed: {', '.join(BUILDERS)}") \
            from None
    return builder(cfg)
