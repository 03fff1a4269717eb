"""Configuration: dataclasses are the one source of truth.

Every field carries its allowed range in ``field(metadata=...)`` (the sections are in
qfleet.config_sections) so one generic validator can name the key, the value and what is
allowed. Presets are TOML files
under ``qfleet/presets``; ``--set section.key=value`` overrides any field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import textwrap
import tomllib
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfleet.config_rules import (
    GRADIENT_SCHEMES,
    aggregation_of,
    check_schemes,
    group_size_of,
    replay_kind_of,
    resolve_start_method,
)
from qfleet.config_sections import (
    PYTHON_ONLY,
    ActorsConfig,
    AlgoConfig,
    CheckpointConfig,
    EnvConfig,
    LearnerConfig,
    LogConfig,
    NetConfig,
    ReplayConfig,
    RuntimeConfig,
    TrainConfig,
    _f,
)
from qfleet.errors import ConfigError, QfleetWarning

# Importable from here too: what the rest of qfleet reads of a config.
__all__ = ["GRADIENT_SCHEMES", "Config", "ConfigError", "QfleetWarning", "aggregation_of",
           "from_dict", "group_size_of", "load_config", "replay_kind_of",
           "resolve_start_method", "to_toml", "validate"]

PRESET_DIR = Path(__file__).parent / "presets"
INT_LIMIT = 2**63  # integers travel as int64 (NumPy, torch seeds, safetensors counters)


@dataclass
class Config:
    seed: int = _f(0, lo=0, help="seeds every random stream: networks, envs, replay")
    env: EnvConfig = field(default_factory=EnvConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    net: NetConfig = field(default_factory=NetConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    description: str = _f("", help="one line shown by `qfleet presets`")

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------- validation

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:  # what TOML can hold (a value that could not be written back is refused)
        return _tomlable(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item)
                                               for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _tomlable(value: Any) -> bool:
    if isinstance(value, list):
        return all(map(_tomlable, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _tomlable(v) for k, v in value.items())
    return isinstance(value, (bool, int, float, str))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[int], float | None: keep the arguments
        return str(tp).replace("NoneType", "none").replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _check_field(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> None:
    if not _type_ok(value, tp):
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}, "
                          f"got {type(value).__name__}")
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: must be a finite number")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ConfigError(f"{key} = {value!r}: must be below 2**63 in magnitude")
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key} = {value!r}: not one of {allowed}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"{key} = {value!r}: must be >= {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"{key} = {value!r}: must be <= {meta['hi']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{key} = {value!r}: must be > {meta['gt']}")


def _fields(obj: Any) -> dict[str, dataclasses.Field[Any]]:
    """The config fields of a section (what TOML holds; not the Python-only ones)."""
    return {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get(PYTHON_ONLY)}


def validate(cfg: Config) -> None:
    hints = typing.get_type_hints(Config)
    for name, f in _fields(cfg).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            section_hints = typing.get_type_hints(type(value))
            for sub, sf in _fields(value).items():
                _check_field(f"{name}.{sub}", getattr(value, sub), section_hints[sub], sf.metadata)
        else:
            _check_field(name, value, hints[name], f.metadata)
    if any(h < 1 for h in cfg.net.hidden):
        raise ConfigError(f"net.hidden = {cfg.net.hidden!r}: every layer width must be >= 1")
    from qfleet.envs import check_env  # late: gymnasium's registry is only needed here

    check_env(cfg.env)
    if cfg.actors.eps_end > cfg.actors.eps_start:
        raise ConfigError(f"actors.eps_end = {cfg.actors.eps_end}: must be <= "
                          f"actors.eps_start ({cfg.actors.eps_start})")
    check_schemes(cfg)


# ---------------------------------------------------------------- building

def _unknown(key: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}; allowed: {', '.join(sorted(known))}")


def from_dict(data: dict[str, Any], env_fn: Callable[..., Any] | None = None) -> Config:
    """Build a validated Config from nested dicts, rejecting unknown keys. ``env_fn``: the
    function that builds the env (EnvConfig.fn), for a run trained with one."""
    top = _fields(Config)
    kwargs: dict[str, Any] = {"env": EnvConfig(fn=env_fn)} if env_fn is not None else {}
    for name, value in data.items():
        if name not in top:
            raise _unknown(name, top)
        section_type = typing.get_type_hints(Config)[name]
        if dataclasses.is_dataclass(section_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} = {value!r}: expected a [{name}] table")
            known = _fields(section_type)
            for sub in value:
                if sub not in known:
                    raise _unknown(f"{name}.{sub}", known)
            extra = {"fn": env_fn} if section_type is EnvConfig and env_fn is not None else {}
            kwargs[name] = section_type(**value, **extra)  # type: ignore[operator]
        else:
            kwargs[name] = value
    return Config(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested dicts of every config field (copies; the Python-only fields left out)."""
    out: dict[str, Any] = {}
    for name in _fields(cfg):
        value = getattr(cfg, name)
        out[name] = {sub: copy.deepcopy(getattr(value, sub)) for sub in _fields(value)} \
            if dataclasses.is_dataclass(value) else value
    return out


def _parse_value(text: str) -> Any:
    if text in ("none", "null"):  # unsets an optional field (train.target_return=none)
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: treat as a string (env.id=CartPole-v1)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override to nested dicts (validated later)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    top = _fields(Config)
    if parts[0] not in top:
        raise _unknown(parts[0], top)
    section_type = typing.get_type_hints(Config)[parts[0]]
    if dataclasses.is_dataclass(section_type):
        if len(parts) >= 2 and parts[1] not in _fields(section_type):
            raise _unknown(key, _fields(section_type))
        is_table = len(parts) == 3 and \
            typing.get_origin(typing.get_type_hints(section_type)[parts[1]]) is dict
        if len(parts) != 2 and not is_table:
            raise ConfigError(f"--set {override!r}: expected {parts[0]}.<key>=value")
        section = data.setdefault(parts[0], {})
        if is_table:  # one key of a table: env.kwargs.map_name=8x8
            table = section.setdefault(parts[1], {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {override!r}: {parts[0]}.{parts[1]} is not a table")
            table[parts[2]] = _parse_value(text.strip())
        else:
            section[parts[1]] = _parse_value(text.strip())
    elif len(parts) == 1:
        data[parts[0]] = _parse_value(text.strip())
    else:
        raise _unknown(key, top)


# ---------------------------------------------------------------- loading

def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: malformed TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): TOML files are "
                          "UTF-8") from None
    if not data:
        warnings.warn(f"{path} sets nothing: every field takes its default",
                      QfleetWarning, stacklevel=3)
    return data


def resolve_source(preset_or_path: str | Path) -> Path:
    """A preset name or a path to a TOML file -> the file to read."""
    text = str(preset_or_path)
    if text.endswith(".toml") or "/" in text or Path(text).exists():
        path = Path(text)
        if path.is_dir():
            raise ConfigError(f"config file {text!r} is a directory, not a TOML file")
        if not path.is_file():
            raise ConfigError(f"config file {text!r} does not exist")
        return path
    if (PRESET_DIR / f"{text}.toml").is_file():
        return PRESET_DIR / f"{text}.toml"
    close = difflib.get_close_matches(text, preset_names(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown preset {text!r}{hint}; available: {', '.join(preset_names())}")


def load_config(preset_or_path: str | Path = "cartpole-dqn",
                overrides: typing.Sequence[str] = (),
                env_fn: Callable[..., Any] | None = None) -> Config:
    """Load a preset name or TOML path, apply ``section.key=value`` overrides, validate.
    ``env_fn``: the function that builds the env, for a run trained with one."""
    data = _read_toml(resolve_source(preset_or_path))
    for override in overrides:
        apply_override(data, override)
    return from_dict(data, env_fn)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # JSON string escapes are valid TOML basic-string escapes
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    return repr(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def to_toml(cfg: Config, explain: bool = False) -> str:
    """Every field, resolved, as TOML (``None`` fields are written as comments);
    ``explain``: each field preceded by its help text and allowed values as comments."""
    lines: list[str] = []
    sections: list[tuple[str, dict[str, Any]]] = []
    for name, value in to_dict(cfg).items():
        if isinstance(value, dict):
            sections.append((name, value))
        elif value is not None:
            lines += _explain(_fields(Config)[name]) if explain else []
            lines.append(f"{name} = {_toml_value(value)}")
    for name, values in sections:
        lines.append(f"\n[{name}]")
        meta = _fields(getattr(cfg, name))
        for key, value in values.items():
            lines += _explain(meta[key]) if explain else []
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _explain(f: dataclasses.Field[Any]) -> list[str]:
    """A field's help text and what it allows, as TOML comment lines."""
    meta = f.metadata
    allowed = []
    if meta.get("choices"):
        allowed.append("one of " + ", ".join(_toml_value(c) for c in meta["choices"]))
    allowed += [f"{op} {meta[k]}" for k, op in (("lo", ">="), ("gt", ">"), ("hi", "<="))
                if meta.get(k) is not None]
    text = meta.get("help", "") + (f" ({'; '.join(allowed)})" if allowed else "")
    return ["# " + line for line in textwrap.wrap(text, 96)]
