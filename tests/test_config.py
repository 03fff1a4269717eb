"""Config: validation messages (key, value, what is allowed), --set parsing, TOML round trip."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from qfleet.config import (
    Config,
    ConfigError,
    LearnerConfig,
    apply_override,
    from_dict,
    load_config,
    preset_names,
    to_dict,
    to_toml,
)


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("cartpole-dqn", list(overrides))
    return str(info.value)


def assert_mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


# ---------------------------------------------------------------- unknown keys


def test_unknown_section_key_suggests_and_lists_allowed() -> None:
    msg = error_of("learner.lrr=0.1")
    assert_mentions(msg, "learner.lrr", "did you mean learner.lr?", "allowed:", "batch_size",
                    "target_update_every")


def test_unknown_section_suggests_section() -> None:
    msg = error_of("lerner.lr=0.1")
    assert_mentions(msg, "lerner", "did you mean learner?", "allowed:", "replay")


def test_unknown_key_in_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[replay]\ncapacityy = 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_mentions(str(info.value), "replay.capacityy", "did you mean replay.capacity?",
                    "allowed:")


def test_unknown_top_level_key_in_dict() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"seeed": 3})
    assert_mentions(str(info.value), "seeed", "did you mean seed?")


def test_section_given_a_scalar() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"learner": 3})
    assert_mentions(str(info.value), "learner", "3", "[learner] table")


# ---------------------------------------------------------------- types and ranges


@pytest.mark.parametrize("override, parts", [
    ("learner.batch_size=1.5", ("learner.batch_size", "1.5", "expected int", "float")),
    ("learner.lr=\"fast\"", ("learner.lr", "'fast'", "expected float", "str")),
    ("learner.lr=fast", ("learner.lr", "'fast'", "expected float", "str")),
    ("seed=true", ("seed", "True", "expected int", "bool")),  # a bool is not an int here
    ("log.tensorboard=1", ("log.tensorboard", "1", "expected bool", "int")),
    ("net.hidden=5", ("net.hidden", "5", "expected list", "int")),
    ("train.target_return=\"high\"", ("train.target_return", "'high'", "float")),
])
def test_wrong_type(override: str, parts: tuple[str, ...]) -> None:
    assert_mentions(error_of(override), *parts)


def test_wrong_list_item_type_names_item_type() -> None:
    msg = error_of('net.hidden=[64, "wide"]')
    assert_mentions(msg, "net.hidden", "'wide'", "int")
    assert "expected list, got list" not in msg


@pytest.mark.parametrize("override, parts", [
    ("learner.lr=0", ("learner.lr", "0", "must be > 0")),
    ("learner.lr=-1e-3", ("learner.lr", "-0.001", "must be > 0")),
    ("algo.gamma=1.5", ("algo.gamma", "1.5", "must be <= 1")),
    ("algo.gamma=-0.1", ("algo.gamma", "-0.1", "must be >= 0")),
    ("env.num_envs=0", ("env.num_envs", "0", "must be >= 1")),
    ("algo.n_step=101", ("algo.n_step", "101", "must be <= 100")),
    ("learner.tau=0.0", ("learner.tau", "0.0", "must be > 0")),
    ("seed=-1", ("seed", "-1", "must be >= 0")),
    ("net.hidden=[64, 0]", ("net.hidden", "[64, 0]", ">= 1")),
    ("actors.eps_end=0.9", ("actors.eps_end", "0.9", "actors.eps_start (0.5)")),
])
def test_out_of_range(override: str, parts: tuple[str, ...]) -> None:
    overrides = [override] + (["actors.eps_start=0.5"] if "eps_end" in override else [])
    assert_mentions(error_of(*overrides), *parts)


@pytest.mark.parametrize("override, parts", [
    ("algo.name=ppo", ("algo.name", "'ppo'", "'dqn'")),
    ("runtime.backend=mpi", ("runtime.backend", "'mpi'", "'inline'", "'ray'")),
    ("net.torso=resnet", ("net.torso", "'resnet'", "'auto'", "'mlp'", "'cnn'")),
    ("learner.device=tpu", ("learner.device", "'tpu'", "'cpu'", "'cuda'")),
])
def test_unknown_choice(override: str, parts: tuple[str, ...]) -> None:
    assert_mentions(error_of(override), *parts)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"learner\.batch_size = 0: must be >= 1"):
        Config(learner=LearnerConfig(batch_size=0))


# ---------------------------------------------------------------- environments


def test_unknown_env_id_suggests_close_ids() -> None:
    assert_mentions(error_of("env.id=CartPole-v9"), "env.id", "'CartPole-v9'",
                    "did you mean", "CartPole-v1", "module:Class")


def test_module_class_env_id_accepted() -> None:
    cfg = load_config("cartpole-dqn", ["env.id=envs_for_tests:ChainEnv"])
    assert cfg.env.id == "envs_for_tests:ChainEnv"


@pytest.mark.parametrize("env_id, parts", [
    ("no_such_module_xyz:Env", ("env.id", "'no_such_module_xyz:Env'", "cannot import module",
                                "no_such_module_xyz")),
    ("envs_for_tests:Missing", ("env.id", "'envs_for_tests:Missing'",
                                "is not a gymnasium.Env class")),
    ("envs_for_tests:NotAnEnv", ("env.id", "'envs_for_tests:NotAnEnv'",
                                 "is not a gymnasium.Env class")),
])
def test_bad_module_class(env_id: str, parts: tuple[str, ...]) -> None:
    assert_mentions(error_of(f"env.id={env_id}"), *parts)


# ---------------------------------------------------------------- files and presets


def test_malformed_toml_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('seed = 1\n[learner]\nlr = = 3\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_mentions(str(info.value), str(path), "malformed TOML", "line 3", "column")


def test_unknown_preset_suggests_and_lists() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("cartpole-dq")
    assert_mentions(str(info.value), "unknown preset 'cartpole-dq'",
                    "did you mean cartpole-dqn?", "available:", "cartpole-dqn")


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/at-all.toml")


# ---------------------------------------------------------------- --set parsing


@pytest.mark.parametrize("override, path, value", [
    ("learner.batch_size=32", ("learner", "batch_size"), 32),
    ("learner.lr=3e-4", ("learner", "lr"), 3e-4),
    ("learner.lr=0.5", ("learner", "lr"), 0.5),
    ("log.tensorboard=false", ("log", "tensorboard"), False),
    ("algo.double=true", ("algo", "double"), True),
    ("net.hidden=[32, 16]", ("net", "hidden"), [32, 16]),
    ("net.hidden=[]", ("net", "hidden"), []),
    ("env.id=Acrobot-v1", ("env", "id"), "Acrobot-v1"),  # bare string
    ('env.id="MountainCar-v0"', ("env", "id"), "MountainCar-v0"),  # quoted string
    ("description=hello world", ("description",), "hello world"),
    ("description=a=b", ("description",), "a=b"),  # only the first '=' splits
    (" seed = 7 ", ("seed",), 7),
    ("train.target_return=200", ("train", "target_return"), 200),
])
def test_set_parsing(override: str, path: tuple[str, ...], value: object) -> None:
    data: dict = {}
    apply_override(data, override)
    got = data
    for part in path:
        got = got[part]
    assert got == value and type(got) is type(value)
    cfg = load_config("cartpole-dqn", [override])  # and it validates
    field = cfg
    for part in path:
        field = getattr(field, part)
    assert field == value


def test_set_later_override_wins_and_keeps_other_fields() -> None:
    cfg = load_config("cartpole-dqn", ["learner.lr=0.1", "learner.lr=0.2"])
    assert cfg.learner.lr == 0.2
    assert cfg.learner.batch_size == 64  # from the preset, untouched


@pytest.mark.parametrize("override, needle", [
    ("learner.lr", "expected section.key=value"),
    ("learner=3", "expected learner.<key>=value"),
    ("learner.lr.x=3", "expected learner.<key>=value"),
])
def test_set_malformed(override: str, needle: str) -> None:
    assert needle in error_of(override)


# ---------------------------------------------------------------- to_toml round trip


@pytest.mark.parametrize("name", preset_names())
def test_to_toml_round_trip_every_preset(name: str, tmp_path: Path) -> None:
    cfg = load_config(name)
    text = to_toml(cfg)
    assert from_dict(tomllib.loads(text)) == cfg
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_to_toml_round_trip_non_defaults(tmp_path: Path) -> None:
    cfg = load_config("cartpole-dqn", [
        "seed=12", "net.hidden=[7]", "net.dueling=true", "algo.double=false",
        "learner.lr=1e-5", "train.target_return=-3.5", "env.id=envs_for_tests:ChainEnv",
        'description="quotes \\" and back\\\\slash"', "log.progress=false"])
    assert cfg.description == 'quotes " and back\\slash'
    again = from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_to_toml_writes_every_field() -> None:
    cfg = load_config("cartpole-dqn")
    parsed = tomllib.loads(to_toml(cfg))
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                if getattr(value, sub.name) is not None:
                    assert sub.name in parsed[f.name], f"{f.name}.{sub.name}"
        else:
            assert f.name in parsed


def test_to_toml_round_trip_string_with_newline() -> None:
    cfg = load_config("cartpole-dqn")
    cfg.description = "two\nlines\twith tab"
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
