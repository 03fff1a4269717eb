"""Algorithms: one module per row of DESIGN.md's table, each wiring roles from a config."""

from __future__ import annotations

from collections.abc import Callable

from qfleet.algos import a2c, a3c, apex, dqn, gorila
from qfleet.algos.program import ActorLearnerProgram, GradientProgram, Schedule
from qfleet.config import Config, ConfigError, aggregation_of, group_size_of, replay_kind_of

Program = ActorLearnerProgram | GradientProgram
BUILDERS: dict[str, Callable[[Config], Program]] = {
    "dqn": dqn.build, "apex": apex.build, "gorila": gorila.build, "a3c": a3c.build,
    "a2c": a2c.build}

__all__ = ["ActorLearnerProgram", "GradientProgram", "Program", "Schedule", "build_program",
           "scheme_row"]


def _data_path(cfg: Config) -> str:
    workers = cfg.actors.count
    if cfg.algo.name == "apex":
        return f"sharded prioritized replay ({workers} shards, actor priorities)"
    if cfg.algo.name in ("a3c", "a2c"):
        queue = cfg.algo.name == "a3c" and cfg.algo.a3c_mode == "queue"
        return "on-policy rollouts" + (" through one global queue" if queue else "")
    kind = f"{replay_kind_of(cfg)} replay"
    if cfg.algo.name == "gorila":
        return {"local": f"local {kind} per worker", "shared": f"one shared {kind}",
                "sharded": f"sharded prioritized replay ({workers} shards, "
                "every worker samples all)"}[cfg.replay.scope]
    return kind + (f" ({cfg.replay.shards} shards)" if cfg.replay.shards > 1 else "")


def _aggregation(cfg: Config) -> str:
    agg, workers = aggregation_of(cfg), cfg.actors.count
    if agg == "single":
        return "single learner"
    if agg == "async" and cfg.algo.name == "a3c":
        return "async (Hogwild, shared memory)" if cfg.algo.a3c_mode == "hogwild" \
            else f"async ({cfg.algo.trainers} trainer threads pop the queue)"
    if agg == "grouped":
        return f"grouped ({workers // group_size_of(cfg)} groups of {group_size_of(cfg)})"
    return f"{agg} ({workers} workers)"


def scheme_row(cfg: Config) -> dict[str, str]:
    """The preset's row of DESIGN.md's table: loss, data path, aggregation, backend."""
    if cfg.algo.name in ("a3c", "a2c"):
        loss = f"advantage actor-critic, {cfg.algo.n_step}-step"
    else:
        loss = "DQN" + (" double" if cfg.algo.double else "") + \
            (f" {cfg.algo.n_step}-step" if cfg.algo.n_step > 1 else "") + \
            (" dueling" if cfg.net.dueling else "")
    return {"loss": loss, "data path": _data_path(cfg), "aggregation": _aggregation(cfg),
            "backend": cfg.runtime.backend}


def build_program(cfg: Config) -> Program:
    try:
        builder = BUILDERS[cfg.algo.name]
    except KeyError:
        raise ConfigError(f"algo.name = {cfg.algo.name!r}: allowed: {', '.join(BUILDERS)}") \
            from None
    return builder(cfg)
