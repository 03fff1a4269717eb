"""Configuration: dataclasses are the one source of truth.

Every field carries its allowed range in ``field(metadata=...)`` so one generic
validator can name the key, the value and what is allowed. Presets are TOML files
under ``qfleet/presets``; ``--set section.key=value`` overrides any field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfleet.errors import ConfigError, QfleetWarning

PRESET_DIR = Path(__file__).parent / "presets"
INT_LIMIT = 2**63  # integers travel as int64 (NumPy, torch seeds, safetensors counters)




def _f(default: Any, *, lo: float | None = None, hi: float | None = None,
       gt: float | None = None, choices: tuple[Any, ...] | None = None,
       help: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "gt": gt, "choices": choices, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EnvConfig:
    id: str = _f("CartPole-v1", help="Gymnasium id or module:Class")
    num_envs: int = _f(1, lo=1, help="environments per actor, stepped as one vector env")
    max_episode_steps: int = _f(0, lo=0, help="0 keeps the env's own limit")
    frame_stack: int = _f(4, lo=1, help="frames stacked for Atari ids")


@dataclass
class AlgoConfig:
    name: str = _f("dqn", choices=("dqn", "apex", "gorila", "a3c", "a2c"))
    gamma: float = _f(0.99, lo=0.0, hi=1.0)
    n_step: int = _f(1, lo=1, hi=100, help="a2c/a3c: the rollout length of each return")
    double: bool = _f(True)
    # Gradient schemes (gorila, a3c, a2c): workers send gradients to a global model.
    aggregation: str = _f("auto", choices=("auto", "sync", "async", "grouped"),
                          help="auto = sync for gorila and a2c, async for a3c")
    group_size: int = _f(0, lo=0, help="grouped: workers averaged synchronously per group; "
                         "groups update the global model asynchronously")
    max_staleness: int = _f(8, lo=0, help="async/grouped: gradients computed on parameters "
                            "more than this many global updates old are dropped or scaled")
    stale: str = _f("drop", choices=("drop", "scale"),
                    help="scale = weight (max_staleness + 1) / (staleness + 1)")
    on_worker_loss: str = _f("proceed", choices=("proceed", "wait"),
                             help="sync: average the live workers, or wait for the restart")
    sync_every: int = _f(1, lo=1, help="gradients a worker sends between parameter pulls")
    a3c_mode: str = _f("hogwild", choices=("hogwild", "queue"),
                       help="hogwild = workers apply gradients to the shared model lock-free; "
                       "queue = workers push rollouts, trainers compute the gradients")
    trainers: int = _f(1, lo=1, help="a3c queue mode: trainer threads popping rollouts")
    value_coef: float = _f(0.5, lo=0.0, help="a2c/a3c: weight of the value loss")
    entropy_coef: float = _f(0.01, lo=0.0, help="a2c/a3c: weight of the entropy bonus")


@dataclass
class NetConfig:
    torso: str = _f("auto", choices=("auto", "mlp", "cnn"))
    hidden: list[int] = _f([256, 256])  # noqa: RUF009 (_f gives lists a default_factory)
    dueling: bool = _f(False)
    activation: str = _f("relu", choices=("relu", "tanh"), help="MLP hidden activation")
    shared_torso: bool = _f(True, help="actor-critic: policy and value heads share one "
                            "torso; false = two separate MLPs (as SB3's A2C builds them)")
    init: str = _f("default", choices=("default", "orthogonal"),
                   help="actor-critic: orthogonal = gain sqrt(2) hidden, 0.01 policy head, "
                   "1 value head (the A2C/PPO convention)")


@dataclass
class ReplayConfig:
    kind: str = _f("auto", choices=("auto", "uniform", "prioritized"),
                   help="auto = prioritized where the scheme samples by priority (apex, "
                   "gorila with scope sharded), else uniform")
    capacity: int = _f(100_000, lo=1)
    alpha: float = _f(0.6, lo=0.0, help="prioritization exponent: p = (|td| + eps) ** alpha")
    beta0: float = _f(0.4, lo=0.0, hi=1.0, help="initial IS exponent, annealed to 1")
    beta_steps: int = _f(0, lo=0, help="transitions added over which beta reaches 1; "
                         "0 = the run's train.total_env_steps")
    eps: float = _f(1e-6, gt=0.0, help="added to |td| so no priority is zero")
    shards: int = _f(1, lo=1, help="prioritized shards sampled by total priority")
    storage: str = _f("auto", choices=("auto", "ring", "frames"),
                      help="frames = each image frame stored once; auto = frames for "
                      "uint8 frame stacks")
    scope: str = _f("local", choices=("local", "shared", "sharded"),
                    help="gorila: each worker its own replay, one replay for all, or one "
                    "prioritized shard per worker sampled by every worker")



@dataclass
class LearnerConfig:
    lr: float = _f(1e-3, gt=0.0)
    batch_size: int = _f(64, lo=1)
    learning_starts: int = _f(1000, lo=0, help="env steps collected before the first update")
    train_every: int = _f(256, lo=1, help="env steps between training rounds")
    updates_per_round: int = _f(128, lo=1, help="gradient steps per training round")
    target_update_every: int = _f(128, lo=1, help="updates between hard target copies")
    tau: float = _f(1.0, gt=0.0, hi=1.0, help="1.0 = hard copy, <1 = Polyak every update")
    huber: bool = _f(True)
    max_grad_norm: float = _f(10.0, lo=0.0, help="0 disables clipping")
    adam_eps: float = _f(1e-8, gt=0.0, help="eps of the optimizer (Adam or RMSprop)")
    optimizer: str = _f("adam", choices=("adam", "rmsprop"),
                        help="rmsprop: alpha 0.99, as A2C/A3C use it")
    max_replay_ratio: float = _f(0.0, lo=0.0, help="cap on sampled / inserted transitions; "
                                 "0 = only the train_every/updates_per_round schedule")
    prefetch: int = _f(1, lo=1, help="prioritized replay: batches drawn at once, their "
                       "priorities written back after all of them (Ape-X prefetching)")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))


@dataclass
class ActorsConfig:
    count: int = _f(1, lo=1)
    eps_start: float = _f(1.0, lo=0.0, hi=1.0)
    eps_end: float = _f(0.04, lo=0.0, hi=1.0)
    eps_fraction: float = _f(0.16, gt=0.0, hi=1.0, help="share of total steps to anneal over")
    chunk_size: int = _f(64, lo=1, help="vector steps an actor takes per chunk")
    sync_every: int = _f(0, lo=0, help="env steps between an actor's parameter pulls; "
                         "0 = before every chunk")
    apex_eps: float = _f(0.4, lo=0.0, hi=1.0, help="Ape-X: actor i explores with "
                         "apex_eps ** (1 + apex_alpha * i / (N - 1))")
    apex_alpha: float = _f(7.0, lo=0.0)


@dataclass
class RuntimeConfig:
    backend: str = _f("inline", choices=("inline", "processes", "ray"))
    address: str = _f("local", help="ray: 'local' starts Ray in this process; 'auto' or "
                      "'ray://host:port' joins a running cluster")
    torch_threads: int = _f(1, lo=0, help="0 keeps torch's default")
    start_method: str = _f("auto", choices=("auto", "fork", "forkserver", "spawn"),
                           help="processes: how worker processes start; auto = fork on "
                           "Linux, spawn elsewhere")
    replay_on: str = _f("learner", choices=("learner", "learner_node", "actors"),
                        help="ray, dqn/apex: 'learner' keeps the replay in the learner's "
                        "process; 'actors' puts one shard actor beside each actor; "
                        "'learner_node' puts the shard actors on the learner's node")
    sample_requests: int = _f(4, lo=1, help="ray, replay_on != 'learner': batches the "
                              "learner keeps requested ahead from the shard actors")
    learner_host: str = _f("driver", choices=("driver", "actor"),
                           help="ray: 'driver' trains in the qfleet process; 'actor' in a Ray "
                           "actor that asks for a GPU when learner.device is cuda (or auto "
                           "and the cluster has one)")


@dataclass
class TrainConfig:
    total_env_steps: int = _f(50_000, lo=1)
    eval_every: int = _f(5_000, lo=0, help="env steps between greedy evals; 0 = only at the end")
    eval_episodes: int = _f(20, lo=1)
    target_return: float | None = _f(None, help="stop once a greedy eval reaches it")


@dataclass
class CheckpointConfig:
    every: int = _f(10_000, lo=0, help="env steps between checkpoints; 0 = only at the end")
    replay: bool = _f(True, help="also save the replay buffers (turn off for huge buffers)")
    keep: int = _f(3, lo=1, help="checkpoints kept; older ones are deleted once a newer one "
                   "is safely on disk")


@dataclass
class LogConfig:
    every: int = _f(1_000, lo=1, help="env steps between metric lines")
    tensorboard: bool = _f(True)
    progress: bool = _f(True)


@dataclass
class Config:
    seed: int = _f(0, lo=0)
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
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[int], float | None: keep the arguments
        return str(tp).replace("NoneType", "none")
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
    return {f.name: f for f in dataclasses.fields(obj)}


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
    from qfleet.envs import check_env_id  # late: gymnasium's registry is only needed here

    check_env_id(cfg.env.id)
    if cfg.actors.eps_end > cfg.actors.eps_start:
        raise ConfigError(f"actors.eps_end = {cfg.actors.eps_end}: must be <= "
                          f"actors.eps_start ({cfg.actors.eps_start})")
    _check_gradient_scheme(cfg)
    _check_replay(cfg)
    _check_ray_fields(cfg)


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


# ---------------------------------------------------------------- building

def _unknown(key: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}; allowed: {', '.join(sorted(known))}")


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated Config from nested dicts, rejecting unknown keys."""
    top = _fields(Config)
    kwargs: dict[str, Any] = {}
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
            kwargs[name] = section_type(**value)  # type: ignore[operator]
        else:
            kwargs[name] = value
    return Config(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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
        if len(parts) != 2:
            raise ConfigError(f"--set {override!r}: expected {parts[0]}.<key>=value")
        if parts[1] not in _fields(section_type):
            raise _unknown(key, _fields(section_type))
        data.setdefault(parts[0], {})[parts[1]] = _parse_value(text.strip())
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
                overrides: typing.Sequence[str] = ()) -> Config:
    """Load a preset name or TOML path, apply ``section.key=value`` overrides, validate."""
    data = _read_toml(resolve_source(preset_or_path))
    for override in overrides:
        apply_override(data, override)
    return from_dict(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # JSON string escapes are valid TOML basic-string escapes
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(cfg: Config) -> str:
    """Every field, resolved, as TOML (``None`` fields are written as comments)."""
    lines: list[str] = []
    sections: list[tuple[str, dict[str, Any]]] = []
    for name, value in to_dict(cfg).items():
        if isinstance(value, dict):
            sections.append((name, value))
        elif value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, values in sections:
        lines.append(f"\n[{name}]")
        for key, value in values.items():
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
