"""MinAtar, the CPU-sized pixel benchmark: its 10x10 maps arrive channels-first as uint8
(the same maps MinAtar's own env returns), the MinAtar paper's one-conv torso takes them,
each MinAtar preset trains and evaluates on every backend, and without the minatar package
the error names the extra to install."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from _presets import train_briefly_and_evaluate

from qfleet.config import ConfigError, EnvConfig, NetConfig, load_config
from qfleet.envs import check_env_id, make_env
from qfleet.nets import MinAtarCNN, make_q_network, pick_torso

BREAKOUT = "MinAtar/Breakout-v1"
PRESETS = ["minatar-breakout-dqn", "minatar-breakout-apex", "minatar-spaceinvaders-apex"]


def test_frames_are_minatars_own_maps_channels_first() -> None:
    ours = make_env(EnvConfig(id=BREAKOUT))
    theirs = gym.make(BREAKOUT)  # registered by make_env: MinAtar's own env, (H, W, C) bool
    rng = np.random.default_rng(0)
    obs, _ = ours.reset(seed=3)
    raw, _ = theirs.reset(seed=3)
    assert ours.observation_space == gym.spaces.Box(0, 1, (4, 10, 10), np.uint8)
    ends = 0
    for _ in range(300):
        assert obs.dtype == np.uint8 and obs.flags.c_contiguous
        for c in range(4):  # channel c of ours is map c of theirs, rows and columns kept
            np.testing.assert_array_equal(obs[c], raw[:, :, c].astype(np.uint8))
        action = int(rng.integers(3))
        obs, reward, done, _, _ = ours.step(action)
        raw, raw_reward, raw_done, _, _ = theirs.step(action)
        assert (reward, done) == (raw_reward, raw_done)
        if done:
            ends += 1
            obs, _ = ours.reset(seed=ends)
            raw, _ = theirs.reset(seed=ends)
    assert ends >= 2  # the comparison crossed episode boundaries
    ours.close()
    theirs.close()


def test_minatar_torso_is_one_conv_and_one_dense_layer_on_unscaled_maps() -> None:
    torch.manual_seed(0)
    net = make_q_network(NetConfig(torso="auto", hidden=[128]), (4, 10, 10), 3)
    cnn = net.torso
    assert isinstance(cnn, MinAtarCNN) and cnn.out_dim == 128
    assert cnn.conv[0].out_channels == 16 and cnn.conv[0].kernel_size == (3, 3)
    assert cnn.fc[0].in_features == 16 * 8 * 8  # 10x10 -> 8x8, no padding
    maps = torch.randint(0, 2, (5, 4, 10, 10), dtype=torch.uint8)
    q = net(maps)
    assert q.shape == (5, 3) and q.dtype == torch.float32
    # 0/1 maps go in as they are (the Nature CNN divides by 255)
    torch.testing.assert_close(cnn(maps), cnn.fc(cnn.conv(maps.float())))
    q.sum().backward()
    assert cnn.conv[0].weight.grad is not None


@pytest.mark.parametrize("torso, shape, expected", [
    ("auto", (4, 10, 10), "minatar"), ("auto", (4, 84, 84), "cnn"), ("auto", (7,), "mlp"),
    ("minatar", (4, 84, 84), "minatar")])
def test_auto_picks_the_minatar_torso_for_small_frames(torso: str, shape: tuple[int, ...],
                                                       expected: str) -> None:
    assert pick_torso(NetConfig(torso=torso), shape) == expected


@pytest.mark.parametrize("torso, shape, needles", [
    ("cnn", (4, 10, 10), ["net.torso = 'cnn'", "36x36", "'minatar'"]),
    ("minatar", (8,), ["net.torso = 'minatar'", "(8,)", "(C, H, W)"]),
    ("minatar", (10, 10, 4), ["net.torso = 'minatar'", "channels-last"]),
    ("minatar", (4, 2, 10), ["net.torso = 'minatar'", "3x3"])])
def test_minatar_torso_refuses_what_it_cannot_take(torso: str, shape: tuple[int, ...],
                                                    needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        pick_torso(NetConfig(torso=torso), shape)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_without_minatar_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for env_id in [k for k in gym.registry if k.startswith("MinAtar/")]:
        monkeypatch.delitem(gym.registry, env_id)
    monkeypatch.setitem(sys.modules, "minatar", None)  # None: "import minatar" fails
    with pytest.raises(ConfigError, match=re.escape("pip install 'qfleet[minatar]'")):
        check_env_id(BREAKOUT)
    with pytest.raises(ConfigError, match=re.escape("env.id = 'MinAtar/Breakout-v1'")):
        load_config("minatar-breakout-dqn")


@pytest.mark.parametrize("backend", ["inline", "processes", pytest.param("ray",
                                                                        marks=pytest.mark.slow)])
@pytest.mark.parametrize("preset", PRESETS)
def test_minatar_presets_train_on_every_backend(preset: str, backend: str, tmp_path: Path,
                                                run_cli: Callable[..., Any]) -> None:
    train_briefly_and_evaluate(preset, backend, ["learner.learning_starts=1000"], 3000, 2,
                               tmp_path / "run", run_cli)
