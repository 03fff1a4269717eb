"""Networks (dueling head, Nature-CNN) and environments (ids, module:Class, space checks)."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from qfleet.algos import build_program
from qfleet.config import ConfigError, EnvConfig, NetConfig, load_config
from qfleet.envs import check_spaces, make_vec_env, seeds_for
from qfleet.experiment import train
from qfleet.nets import MLP, NatureCNN, QNetwork, make_q_network, pick_torso
from qfleet.policies import EpsilonSchedule
from qfleet.roles import Actor

# ---------------------------------------------------------------- networks


def test_dueling_shapes_and_mean_advantage_identity() -> None:
    torch.manual_seed(0)
    net = make_q_network(NetConfig(hidden=[16, 8], dueling=True), (3,), 5)
    assert isinstance(net.torso, MLP) and net.value is not None
    assert net.value.out_features == 1 and net.advantage.out_features == 5
    obs = torch.randn(7, 3)
    q = net(obs)
    assert q.shape == (7, 5)
    h = net.torso(obs)
    v, a = net.value(h), net.advantage(h)
    # mean over actions of Q is V, and Q - V is the advantage minus its mean
    torch.testing.assert_close(q.mean(dim=1, keepdim=True), v)
    torch.testing.assert_close(q - v, a - a.mean(dim=1, keepdim=True))
    assert q.argmax(1).tolist() == a.argmax(1).tolist()  # greedy action is A's argmax


def test_plain_head_is_the_advantage_layer() -> None:
    torch.manual_seed(0)
    net = make_q_network(NetConfig(hidden=[16], dueling=False), (4,), 3)
    assert net.value is None
    obs = torch.randn(6, 4)
    torch.testing.assert_close(net(obs), net.advantage(net.torso(obs)))
    assert net(obs).shape == (6, 3)


def test_mlp_layers_follow_hidden() -> None:
    mlp = MLP(4, [32, 16, 8])
    widths = [(m.in_features, m.out_features) for m in mlp.body if isinstance(m, torch.nn.Linear)]
    assert widths == [(4, 32), (32, 16), (16, 8)] and mlp.out_dim == 8
    assert MLP(4, []).out_dim == 4  # no hidden layers: a linear Q head on the raw obs


def test_nature_cnn_on_uint8_frames() -> None:
    torch.manual_seed(0)
    net = make_q_network(NetConfig(torso="auto", hidden=[512], dueling=True), (4, 84, 84), 6)
    assert isinstance(net.torso, NatureCNN)
    assert net.torso.fc[0].in_features == 64 * 7 * 7  # 84 -> 20 -> 9 -> 7
    assert net.torso.out_dim == 512
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    q = net(frames)
    assert q.shape == (2, 6) and q.dtype == torch.float32
    # frames are scaled to [0, 1] inside the torso
    cnn = net.torso
    torch.testing.assert_close(cnn(frames), cnn.fc(cnn.conv(frames.float() / 255.0)))
    q.sum().backward()  # differentiable end to end
    assert cnn.conv[0].weight.grad is not None


@pytest.mark.parametrize("torso, shape, needle", [
    ("mlp", (4, 84, 84), "net.torso = 'mlp'"),
    ("cnn", (8,), "net.torso = 'cnn'"),
    ("cnn", (1, 20, 20), "36x36"),
])
def test_pick_torso_rejects_what_it_cannot_take(torso: str, shape: tuple[int, ...],
                                                 needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        pick_torso(NetConfig(torso=torso), shape)


def test_pick_torso_auto() -> None:
    assert pick_torso(NetConfig(torso="auto"), (8,)) == "mlp"
    assert pick_torso(NetConfig(torso="auto"), (4, 84, 84)) == "cnn"


def test_qnetwork_is_a_plain_module() -> None:
    net = QNetwork(MLP(2, [4]), 4, 3, dueling=False)
    assert sum(p.numel() for p in net.parameters()) == (2 * 4 + 4) + (4 * 3 + 3)


# ---------------------------------------------------------------- environments


def test_registered_env_vectorized_and_seeded() -> None:
    cfg = EnvConfig(id="CartPole-v1", num_envs=3)
    a, b = make_vec_env(cfg), make_vec_env(cfg)
    try:
        assert a.num_envs == 3
        seeds = seeds_for(0, 1, 3)
        assert len(set(seeds)) == 3 and seeds == seeds_for(0, 1, 3) != seeds_for(0, 2, 3)
        obs_a, _ = a.reset(seed=seeds)
        obs_b, _ = b.reset(seed=seeds)
        np.testing.assert_array_equal(obs_a, obs_b)
        assert not np.array_equal(obs_a[0], obs_a[1])
    finally:
        a.close()
        b.close()


def test_custom_env_by_module_class_with_time_limit() -> None:
    env = make_vec_env(EnvConfig(id="envs_for_tests:ChainEnv", num_envs=2, max_episode_steps=3))
    try:
        env.reset(seed=[0, 1])
        # env 0 goes left (never reaches the end): truncated by the limit at step 3
        for _ in range(2):
            _, _, term, trunc, _ = env.step(np.array([0, 0]))
            assert not (term.any() or trunc.any())
        _, _, term, trunc, info = env.step(np.array([0, 0]))
        assert trunc.tolist() == [True, True] and term.tolist() == [False, False]
        assert info["final_obs"][0].tolist() == [0.0, 3.0]  # the true last obs is kept
    finally:
        env.close()


def test_continuous_action_space_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not Discrete"):
        make_vec_env(EnvConfig(id="envs_for_tests:ContinuousActionEnv"))
    cfg = load_config("cartpole-dqn", ["env.id=envs_for_tests:ContinuousActionEnv"])
    with pytest.raises(ConfigError) as info:
        build_program(cfg)
    assert "envs_for_tests:ContinuousActionEnv" in str(info.value)
    assert "discrete action space" in str(info.value)


def test_dict_observation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"observation space .* is not supported"):
        make_vec_env(EnvConfig(id="envs_for_tests:DictObsEnv"))
    with pytest.raises(ConfigError, match="allowed: a flat Box"):
        check_spaces("x", gym.spaces.Box(0, 1, shape=(2, 2)), gym.spaces.Discrete(2))


def test_image_obs_with_mlp_torso_is_a_config_error() -> None:
    cfg = load_config("cartpole-dqn", ["env.id=envs_for_tests:ImageEnv", "net.torso=mlp"])
    with pytest.raises(ConfigError) as info:
        build_program(cfg)
    for part in ("net.torso = 'mlp'", "(4, 84, 84)", "'cnn'"):
        assert part in str(info.value)


def test_small_image_with_cnn_is_a_config_error() -> None:
    cfg = load_config("cartpole-dqn", ["env.id=envs_for_tests:SmallImageEnv", "net.torso=cnn"])
    with pytest.raises(ConfigError, match=r"36x36.*net\.torso = 'minatar'"):
        build_program(cfg)


def test_image_env_builds_cnn_and_actor_stores_uint8() -> None:
    cfg = load_config("cartpole-dqn", ["env.id=envs_for_tests:ImageEnv", "env.num_envs=2",
                                       "net.hidden=[32]", "algo.n_step=2"])
    net = build_program(cfg).make_eval_net()
    assert isinstance(net, QNetwork) and isinstance(net.torso, NatureCNN)
    actor = Actor(cfg.env, net, n_step=2, gamma=0.99, epsilon=EpsilonSchedule(1.0, 1.0, 1),
                  seed=0, index=0)
    try:
        chunk = actor.collect(6)  # episodes last 5 steps: one ends inside the chunk
        tr = chunk.transitions
        assert chunk.env_steps == 12 and len(tr) == 12 - 2  # 2 envs x 1 step still pending
        assert tr.obs_NO.dtype == np.uint8 and tr.obs_NO.shape[1:] == (4, 84, 84)
        assert chunk.episode_lengths == [5, 5]
    finally:
        actor.close()


def test_actor_uses_true_final_obs_at_episode_ends() -> None:
    """With SAME_STEP autoreset the obs after a done step is the reset obs; the stored
    transition must bootstrap from the real last obs, so (obs, action) -> next_obs always
    follows ChainEnv's dynamics (position +-1, step counter +1)."""
    cfg = EnvConfig(id="envs_for_tests:ChainEnv", num_envs=3, max_episode_steps=6)
    net = make_q_network(NetConfig(hidden=[8]), (2,), 2)
    actor = Actor(cfg, net, n_step=1, gamma=0.9, epsilon=EpsilonSchedule(1.0, 1.0, 1), seed=0,
                  index=0)
    try:
        chunk = actor.collect(200)
    finally:
        actor.close()
    tr = chunk.transitions
    assert len(tr) == 600
    pos, steps = tr.obs_NO[:, 0], tr.obs_NO[:, 1]
    expected_pos = np.where(tr.action_N == 1, pos + 1, np.maximum(pos - 1, 0))
    np.testing.assert_array_equal(tr.next_obs_NO[:, 0], expected_pos)
    np.testing.assert_array_equal(tr.next_obs_NO[:, 1], steps + 1)
    terminal = tr.next_obs_NO[:, 0] == 4
    assert terminal.any() and (tr.discount_N[terminal] == 0).all()
    assert (tr.reward_N[terminal] == 1).all() and (tr.reward_N[~terminal] == 0).all()
    truncated = (tr.next_obs_NO[:, 1] == 6) & ~terminal
    assert truncated.any()
    np.testing.assert_allclose(tr.discount_N[~terminal], 0.9)
    assert len(chunk.episode_returns) == len(chunk.episode_lengths) > 0


def test_custom_env_trains_end_to_end(tmp_path: Path) -> None:
    cfg = load_config("cartpole-dqn", [
        "env.id=envs_for_tests:ChainEnv", "env.max_episode_steps=20", "net.hidden=[16]",
        "train.total_env_steps=640", "learner.learning_starts=128", "learner.train_every=64",
        "learner.updates_per_round=4", "train.eval_every=0", "train.eval_episodes=2",
        "log.tensorboard=false", "log.progress=false",
        "log.every=128"])
    result = train(cfg, tmp_path / "run")
    assert result.env_steps == 640
    assert result.updates == ((640 - 128) // 64 + 1) * 4
    assert (tmp_path / "run" / "result.json").is_file()
