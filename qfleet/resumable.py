"""What a checkpoint must hold for a run to resume from it: the fields a resume cannot
change, the counters and their types, the config it was written with."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qfleet import checkpoint
from qfleet.config import Config, ConfigError, from_dict, replay_kind_of
from qfleet.envs import ENV_FN, env_fn_needed

# Fields a resumed run cannot change: they shape the networks, the optimizer state, the
# replay or the roles.
FIXED_ON_RESUME = ("env.id", "env.frame_stack", "algo.name", "algo.n_step", "algo.gamma",
                   "net.torso", "net.hidden", "net.dueling", "net.activation",
                   "net.shared_torso", "actors.count", "replay.kind", "replay.capacity",
                   "replay.shards", "replay.storage", "replay.scope", "runtime.backend",
                   "algo.a3c_mode", "learner.optimizer")


# Fields whose "auto" resolves per scheme: compared resolved, so "auto" and what it means
# are the same value.
RESOLVED: dict[str, Callable[[Config], Any]] = {"replay.kind": replay_kind_of}


def check_resumable(saved: Config, cfg: Config) -> None:
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if key in RESOLVED:
            old, new = RESOLVED[key](saved), RESOLVED[key](cfg)
        if old != new:
            raise ConfigError(f"{key} = {new!r}: cannot change on resume "
                              f"(the checkpoint has {old!r})")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The counters every checkpoint holds, and what each must be (the runners check the rest).
COUNTER_RULES: dict[str, Callable[[Any], bool]] = {
    "env_steps": _count, "updates": _count, "actor_restarts": _count, "wall_s": _number,
    "eval_s": _number, "best_eval": _number,
    "recent_returns": lambda v: isinstance(v, list) and all(map(_number, v)),
    "next": lambda v: isinstance(v, list) and len(v) == 3 and all(map(_count, v)),
    "solved": lambda v: v is None or (isinstance(v, list) and len(v) == 2
                                      and all(map(_number, v)))}


def check_counters(ckpt: Path, meta: dict[str, Any]) -> None:
    for key, ok in COUNTER_RULES.items():
        if key not in meta or not ok(meta[key]):
            raise checkpoint.CheckpointError(f"{ckpt}: state.json has no valid {key!r} "
                                             f"({meta.get(key, 'missing')!r})")


def saved_config(ckpt: Path, meta: dict[str, Any],
                 env_fn: Callable[..., Any] | None = None) -> Config:
    """The config a checkpoint was written with (CheckpointError if it is unreadable;
    ConfigError if its env came from a function ``env_fn`` must give again)."""
    try:
        text = meta["config"]
        if not isinstance(text, str):
            raise TypeError(f"config is {type(text).__name__}, not TOML text")
        data = tomllib.loads(text)
        env_id = data["env"].get("id", "") if isinstance(data.get("env"), dict) else ""
        if env_fn is not None or not str(env_id).startswith(ENV_FN):
            return from_dict(data, env_fn)
    except (KeyError, TypeError, tomllib.TOMLDecodeError, ConfigError) as err:
        raise checkpoint.CheckpointError(f"{ckpt}: state.json holds no valid config "
                                         f"({type(err).__name__}: {err})") from None
    raise env_fn_needed(env_id)  # a sound config, whose env only that function builds
