"""Your own environment: env.kwargs, env.wrappers (in order, in every actor and in eval),
Gymnasium's module:EnvId ids, module:Class kept, Discrete observations one-hot encoded, and
qfleet.train(cfg, env_fn=...) with forked (any function) and spawned (a picklable one)
workers."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import custom_envs
import numpy as np
import pytest

import qfleet
from qfleet.cli import main
from qfleet.config import ConfigError, load_config
from qfleet.envs import ENV_FN, make_env, probe_spaces

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["learner.learning_starts=200", "net.hidden=[32]", "train.eval_episodes=2",
         "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
         "train.eval_every=0", "train.total_env_steps=1000"]
CORRIDOR = f"custom_envs:{custom_envs.REGISTERED_ID}"
WRAPPERS = "env.wrappers=['custom_envs:mark_first', 'custom_envs:mark_second', " \
           "'custom_envs:reward_times_ten']"


def test_env_kwargs_reach_gym_make_and_a_class() -> None:
    lake = load_config("cartpole-dqn", ["env.id=FrozenLake-v1", "env.kwargs.map_name=8x8",
                                        "env.kwargs.is_slippery=false"]).env
    assert probe_spaces(lake)[0] == (64,)  # 8x8 cells, one-hot
    made = make_env(lake)
    assert made.spec is not None and made.spec.kwargs["is_slippery"] is False
    corridor = load_config("cartpole-dqn", ["env.id=custom_envs:Corridor",
                                            "env.kwargs={length = 6, reward = 2.5}"]).env
    env = make_env(corridor)
    assert (env.unwrapped.length, env.unwrapped.reward) == (6, 2.5)  # type: ignore[attr-defined]
    assert probe_spaces(corridor) == ((6,), np.dtype(np.float32), 2)


def test_module_envid_imports_the_module_then_makes_the_id(run_cli: Callable[..., Any]) \
        -> None:
    # A fresh process: only importing custom_envs registers the id.
    proc = run_cli("config", "cartpole-dqn", "--set", f"env.id={CORRIDOR}")
    assert proc.returncode == 0, proc.stderr
    assert f'id = "{CORRIDOR}"' in proc.stdout
    env = make_env(load_config("cartpole-dqn", [f"env.id={CORRIDOR}"]).env)
    assert env.spec is not None and env.spec.max_episode_steps == 50  # its registration's
    with pytest.raises(ConfigError, match=r"env.id = 'custom_envs:nope/Gone-v0': .* a "
                                          "Gymnasium id that importing 'custom_envs' registers"):
        load_config("cartpole-dqn", ["env.id=custom_envs:nope/Gone-v0"])


@pytest.fixture(scope="module")
def wrapped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Ape-X with two actor processes on the registered Corridor, through three wrappers
    (two that mark which process built an env, one that scales rewards by 10)."""
    tmp = tmp_path_factory.mktemp("wrapped")
    marks = tmp / "marks.txt"
    os.environ[custom_envs.MARKS_ENV] = str(marks)  # inherited by the forked actors
    try:
        cfg = load_config("cartpole-apex", [
            *SMALL, f"env.id={CORRIDOR}", WRAPPERS, "runtime.backend=processes",
            "actors.count=2", "log.every=100"])
        qfleet.train(cfg, tmp / "run")
    finally:
        del os.environ[custom_envs.MARKS_ENV]
    return tmp / "run", marks


def test_wrappers_apply_in_order_in_every_actor_and_in_eval(
        wrapped_run: tuple[Path, Path]) -> None:
    run_dir, marks = wrapped_run
    by_process: dict[int, list[str]] = defaultdict(list)
    for line in marks.read_text().splitlines():
        name, pid = line.split()
        by_process[int(pid)].append(name)
    assert os.getpid() in by_process and len(by_process) == 3  # eval here + 2 actors
    for names in by_process.values():
        assert names == ["first", "second"] * (len(names) // 2), names
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_returns = [r["return_mean"] for r in records
                     if r["event"] == "train" and r["return_mean"] is not None]
    assert max(train_returns) > 1.0  # unscaled, an episode returns at most 1: actors scale
    result = json.loads((run_dir / "result.json").read_text())
    assert result["eval_return_mean"] in (0.0, 5.0, 10.0)  # 2 episodes of 0 or 10 each


def test_discrete_observations_are_one_hot_and_predict_takes_indices(
        wrapped_run: tuple[Path, Path]) -> None:
    policy = qfleet.load_policy(wrapped_run[0])
    assert policy.observation_space.shape == (4,)
    eye = np.eye(4, dtype=np.float32)
    np.testing.assert_array_equal(policy.predict(np.arange(4)), policy.predict(eye))
    assert policy.predict(2) == policy.predict(eye[2])
    env = policy.make_env()  # the wrappers too: the goal pays 10
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, eye[0])
    rewards = [env.step(1)[1] for _ in range(3)]
    assert rewards == [0.0, 0.0, 10.0]


def test_env_fn_on_forked_workers_can_be_any_function(tmp_path: Path) -> None:
    length = 5  # a closure over a local: forked workers inherit it, nothing is pickled

    def corridor(**kwargs: Any) -> custom_envs.Corridor:
        return custom_envs.Corridor(length=length, **kwargs)

    cfg = load_config("cartpole-apex", [*SMALL, "runtime.backend=processes", "actors.count=2",
                                        "env.max_episode_steps=50"])
    qfleet.train(cfg, tmp_path / "run", env_fn=corridor)
    saved = load_config(tmp_path / "run" / "config.toml", env_fn=corridor)
    assert saved.env.id == f"{ENV_FN}:test_custom_env.test_env_fn_on_forked_workers_can_be_" \
        "any_function.<locals>.corridor"
    with pytest.raises(ConfigError, match=r"pass the same function again: "
                                          r"qfleet\.load_policy\(path, env_fn=\.\.\.\)"):
        qfleet.load_policy(tmp_path / "run")
    assert main(["eval", str(tmp_path / "run")]) == 2
    policy = qfleet.load_policy(tmp_path / "run", env_fn=corridor)
    assert policy.observation_space.shape == (5,)
    more = load_config(tmp_path / "run" / "config.toml", ["train.total_env_steps=1500"],
                       env_fn=corridor)
    assert qfleet.resume(tmp_path / "run", more, env_fn=corridor).env_steps >= 1500


def test_env_fn_on_spawned_workers_is_recorded_by_name(tmp_path: Path) -> None:
    cfg = load_config("cartpole-dqn", [*SMALL, "runtime.backend=processes",
                                       "runtime.start_method=spawn", "env.kwargs.length=5",
                                       "env.max_episode_steps=50"])
    qfleet.train(cfg, tmp_path / "run", env_fn=custom_envs.make_corridor)
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.env.id == "custom_envs:make_corridor" and saved.env.fn is None
    assert qfleet.load_policy(tmp_path / "run").observation_space.shape == (5,)


def test_env_fn_that_cannot_pickle_is_refused_before_spawning(tmp_path: Path) -> None:
    cfg = load_config("cartpole-dqn", [*SMALL, "runtime.backend=processes",
                                       "runtime.start_method=spawn"])
    with pytest.raises(ConfigError, match=r"env_fn = .*start_method = 'spawn' sends it to "
                                          r"worker processes by pickle"):
        qfleet.train(cfg, tmp_path / "run", env_fn=lambda **kw: custom_envs.Corridor(**kw))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, needles", [
    ("env.kwargs.bogus=1", ("env.kwargs = {'bogus': 1}", "unexpected keyword argument")),
    ("env.wrappers=['no_such_module_xyz:wrap']",
     ("env.wrappers[0] = 'no_such_module_xyz:wrap'", "cannot import module")),
    ("env.wrappers=['builtins:str']", ("env.wrappers[0] = 'builtins:str'",
                                       "returned str, not a gymnasium.Env")),
    ("env.id=custom_envs:Missing", ("custom_envs.Missing is not a gymnasium.Env class",)),
])
def test_a_bad_env_is_one_line_and_exit_2(override: str, needles: tuple[str, ...],
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--set", override,
                 *[a for s in SMALL for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err
