"""The rules that tie config fields together: what "auto" resolves to per scheme, and the
combinations a scheme refuses (each error names the field, the value and what is allowed).
``config.validate`` runs them after checking every field on its own."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from qfleet.errors import ConfigError

if TYPE_CHECKING:
    from qfleet.config import Config


def check_schemes(cfg: Config) -> None:
    _check_env_fn(cfg)
    _check_gradient_scheme(cfg)
    _check_replay(cfg)
    _check_ray_fields(cfg)


def resolve_start_method(method: str) -> str:
    """runtime.start_method: 'auto' forks on Linux and spawns elsewhere (macOS cannot fork
    safely once system frameworks are loaded, as torch's docs warn)."""
    if method == "auto":
        return "fork" if sys.platform.startswith("linux") else "spawn"
    return method


def _check_env_fn(cfg: Config) -> None:
    """A function that builds the env travels to spawned workers by pickle (forked ones
    inherit it, Ray's cloudpickle takes lambdas too)."""
    method = resolve_start_method(cfg.runtime.start_method)
    if cfg.env.fn is not None and cfg.runtime.backend == "processes" and method != "fork":
        from qfleet.envs import check_picklable

        check_picklable(cfg.env.fn, method)


def _check_ray_fields(cfg: Config) -> None:
    rt = cfg.runtime
    if rt.start_method != "auto" and rt.backend != "processes":
        raise ConfigError(f"runtime.start_method = {rt.start_method!r}: only the processes "
                          f"backend starts worker processes; runtime.backend = "
                          f"{rt.backend!r} keeps 'auto'")
    for key, value, default in (("replay_on", rt.replay_on, "learner"),
                                ("learner_host", rt.learner_host, "driver")):
        if value != default and rt.backend != "ray":
            raise ConfigError(f"runtime.{key} = {value!r}: only the ray backend places roles "
                              f"on a cluster; runtime.backend = {rt.backend!r} keeps "
                              f"{default!r}")
    if rt.replay_on != "learner" and cfg.learner.background_sample == "on":
        raise ConfigError(f"learner.background_sample = 'on': runtime.replay_on = "
                          f"{rt.replay_on!r} keeps the replay on other Ray actors, whose "
                          "calls already run ahead of the learner; set it to 'auto' or 'off'")
    if rt.replay_on != "learner" and cfg.algo.name not in ("dqn", "apex"):
        raise ConfigError(f"runtime.replay_on = {rt.replay_on!r}: only dqn and apex keep a "
                          f"replay of actors' transitions; algo.name = {cfg.algo.name!r} "
                          "keeps 'learner'")


GRADIENT_SCHEMES = ("gorila", "a3c", "a2c")


def replay_kind_of(cfg: Config) -> str:
    """The resolved replay.kind: schemes that sample by priority need 'prioritized'."""
    by_priority = cfg.algo.name == "apex" or (cfg.algo.name == "gorila"
                                               and cfg.replay.scope == "sharded")
    if cfg.replay.kind == "auto":
        return "prioritized" if by_priority else "uniform"
    return cfg.replay.kind


def _check_replay(cfg: Config) -> None:
    rc, kind = cfg.replay, replay_kind_of(cfg)
    needs = "algo.name = 'apex'" if cfg.algo.name == "apex" else "replay.scope = 'sharded'"
    if kind == "uniform" and (cfg.algo.name == "apex" or rc.scope == "sharded"):
        raise ConfigError(f"replay.kind = 'uniform': {needs} samples shards by priority; "
                          "allowed: 'prioritized' or 'auto'")
    if rc.shards > 1 and kind == "uniform":
        raise ConfigError(f"replay.shards = {rc.shards}: sharding needs "
                          "replay.kind = 'prioritized'")


def aggregation_of(cfg: Config) -> str:
    """The resolved aggregation: 'single' for actor-learner schemes, else sync/async/grouped."""
    algo = cfg.algo
    if algo.name not in GRADIENT_SCHEMES:
        return "single"
    if algo.aggregation != "auto":
        return algo.aggregation
    return "async" if algo.name == "a3c" else "sync"


def group_size_of(cfg: Config) -> int:
    """Workers averaged together before one global step: W for sync, 1 for async."""
    agg = aggregation_of(cfg)
    return {"sync": cfg.actors.count, "async": 1}.get(agg, cfg.algo.group_size)


def _check_gradient_scheme(cfg: Config) -> None:
    algo, workers = cfg.algo, cfg.actors.count
    agg = aggregation_of(cfg)
    if agg == "single" and algo.aggregation != "auto":
        raise ConfigError(f"algo.aggregation = {algo.aggregation!r}: only gradient schemes "
                          f"({', '.join(GRADIENT_SCHEMES)}) aggregate gradients; "
                          f"algo.name = {algo.name!r} has a single learner")
    if algo.name == "a3c" and agg != "async":
        raise ConfigError(f"algo.aggregation = {agg!r}: a3c is asynchronous; "
                          "use algo.name = 'a2c' for the synchronous counterpart")
    if algo.name == "a2c" and agg != "sync":
        raise ConfigError(f"algo.aggregation = {agg!r}: a2c is synchronous; "
                          "use algo.name = 'a3c' for the asynchronous counterpart")
    if algo.name == "gorila" and agg == "sync" and workers == 1:
        raise ConfigError("algo.aggregation = 'sync' with actors.count = 1: sync averages "
                          "the gradients of several workers; set actors.count >= 2")
    if agg == "grouped" and (algo.group_size < 1 or workers % algo.group_size):
        divisors = ", ".join(str(g) for g in range(1, workers + 1) if workers % g == 0)
        raise ConfigError(f"algo.group_size = {algo.group_size}: must divide actors.count = "
                          f"{workers} (allowed: {divisors})")
    if algo.name == "a3c" and algo.a3c_mode == "queue" \
            and cfg.replay.capacity < cfg.learner.batch_size:
        raise ConfigError(f"replay.capacity = {cfg.replay.capacity}: the a3c queue must hold "
                          f"at least one batch (learner.batch_size = {cfg.learner.batch_size})")
    if cfg.replay.scope != "local" and algo.name != "gorila":
        raise ConfigError(f"replay.scope = {cfg.replay.scope!r}: only gorila workers share "
                          f"replay; {algo.name} keeps 'local'")
