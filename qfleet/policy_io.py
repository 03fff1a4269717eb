"""A trained policy outside training: ``qfleet.load_policy(path)`` -> ``Policy``.

``path`` is a run directory, one checkpoint folder, or a folder ``qfleet push`` prepared
(model.safetensors + config.toml). Only safetensors and JSON/TOML are read, never pickle.
``Policy.predict`` takes NumPy observations (one, or a batch) and returns NumPy actions on
whatever device the network sits; ``Policy.make_env`` builds the env the policy was
trained on, with its wrappers.
"""

from __future__ import annotations

import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qfleet import checkpoint
from qfleet.algos import build_program
from qfleet.config import Config, ConfigError, QfleetWarning, from_dict, to_toml
from qfleet.envs import OneHot, make_env, one_hot
from qfleet.nets import ActorCritic

MODEL_FILE = "model.safetensors"  # a pushed policy: the online network's weights alone
CONFIG_FILE = "config.toml"
FORMAT = "qfleet-policy/1"
EnvFn = Callable[..., Any]


class Policy:
    """The greedy (or sampling) policy of a trained network.

    ``net`` takes a batch of network inputs and returns Q-values (DQN schemes) or policy
    logits (actor-critic); ``config`` is the run's config; ``observation_space`` is what the
    network takes (after the env's wrappers and one-hot encoding)."""

    def __init__(self, net: nn.Module, config: Config, device: str = "auto",
                 source: Path | None = None, seed: int | None = None) -> None:
        self.device = torch.device(_device(device))
        self.net, self.config, self.source = net.to(self.device).eval(), config, source
        probe = self.make_env()
        try:
            self.observation_space, self.action_space = probe.observation_space, \
                probe.action_space
            # Trained on Discrete observations: predict also takes the raw indices.
            self._one_hot = probe if isinstance(probe, OneHot) else None
        finally:
            probe.close()
        self._rng = np.random.default_rng(seed)

    def make_env(self, render_mode: str | None = None) -> gym.Env[Any, Any]:
        """The env this policy was trained on, built as training built it (env.kwargs,
        Atari preprocessing, env.wrappers, one-hot observations)."""
        return make_env(self.config.env, render_mode)

    def values(self, obs: Any) -> np.ndarray:
        """Q-values (DQN schemes) or policy logits (actor-critic) per action: (A,) for one
        observation, (B, A) for a batch."""
        batch, single = self._as_batch(obs)
        out = self._values(batch)
        return out[0] if single else out

    def predict(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions (int64) for one observation (a 0-d array) or a batch ((B,) array).
        ``deterministic=False`` samples: from the policy's softmax for actor-critic, epsilon-
        greedy with the actors' final epsilon (actors.eps_end) for Q-networks."""
        batch, single = self._as_batch(obs)
        values = self._values(batch)
        actions = values.argmax(axis=1)
        if not deterministic:
            actions = self._sample(values, actions)
        actions = actions.astype(np.int64)
        return actions[0, ...] if single else actions

    @torch.no_grad()
    def _values(self, batch: np.ndarray) -> np.ndarray:
        return self.net(torch.as_tensor(batch, device=self.device)).float().cpu().numpy()

    def _sample(self, values: np.ndarray, greedy: np.ndarray) -> np.ndarray:
        rows, num_actions = values.shape
        if isinstance(self.net, ActorCritic):
            logits = values.astype(np.float64)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
            return np.minimum((cdf < self._rng.random((rows, 1))).sum(axis=1), num_actions - 1)
        explore = self._rng.random(rows) < self.config.actors.eps_end
        return np.where(explore, self._rng.integers(num_actions, size=rows), greedy)

    def _as_batch(self, obs: Any) -> tuple[np.ndarray, bool]:
        """(a batch of network inputs, whether ``obs`` was one observation)."""
        arr = np.asarray(obs)
        if self._one_hot is not None and np.issubdtype(arr.dtype, np.integer):
            arr = one_hot(arr - self._one_hot.start, self._one_hot.n)
        shape = tuple(self.observation_space.shape or ())
        if arr.shape == shape:
            return arr[None], True
        if arr.shape[1:] == shape:
            return arr, False
        raise ValueError(f"observation shape {arr.shape}: expected {shape} (one observation) "
                         f"or (batch, {', '.join(map(str, shape))}) (a batch)")

    def __repr__(self) -> str:
        return (f"Policy({type(self.net).__name__} for {self.config.env.id!r}, "
                f"{self.config.algo.name}, device {self.device}, from {self.source})")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_net(ckpt: Path, env_fn: EnvFn | None = None) -> tuple[nn.Module, Config]:
    from qfleet.resumable import saved_config

    tensors, meta, _ = checkpoint.load(ckpt)
    cfg = saved_config(ckpt, meta, env_fn)
    return _with_weights(cfg, checkpoint.with_prefix(tensors, "online."), ckpt), cfg


def _with_weights(cfg: Config, weights: dict[str, torch.Tensor], where: Path) -> nn.Module:
    net = build_program(cfg).make_eval_net()  # the scheme's network, without its roles
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise checkpoint.CheckpointError(f"{where}: the saved network does not match its "
                                         f"config ({str(err).splitlines()[0]})") from None
    return net.eval()


def _load_folder(folder: Path, env_fn: EnvFn | None) -> tuple[nn.Module, Config]:
    """A folder ``qfleet push`` prepared: model.safetensors + config.toml."""
    try:
        cfg = from_dict(tomllib.loads((folder / CONFIG_FILE).read_text()), env_fn)
    except (OSError, tomllib.TOMLDecodeError, ConfigError) as err:
        raise checkpoint.CheckpointError(f"{folder}: no valid {CONFIG_FILE} "
                                         f"({type(err).__name__}: {err})") from None
    try:
        weights = load_file(str(folder / MODEL_FILE))
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise checkpoint.CheckpointError(f"{folder / MODEL_FILE}: unreadable "
                                         f"({type(err).__name__}: {err})") from None
    return _with_weights(cfg, weights, folder), cfg


def load_policy(path: str | Path, *, device: str = "auto", env_fn: EnvFn | None = None,
                seed: int | None = None) -> Policy:
    """The policy under ``path``: a run directory (its newest loadable checkpoint; a damaged
    newer one is skipped with a warning), one checkpoint folder, or a folder ``qfleet push``
    prepared. ``device``: "auto" (CUDA when torch sees it), "cpu", "cuda", "cuda:1", ...
    ``env_fn``: the function a run was trained with (qfleet.train(cfg, env_fn=...)), when
    it cannot be imported by name. ``seed``: for ``predict(deterministic=False)``."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        (net, cfg), source = _load_folder(path, env_fn), path
    else:
        (net, cfg), source, skipped = checkpoint.first_loadable(
            path, lambda ckpt: _load_net(ckpt, env_fn))
        for why in skipped:
            warnings.warn(f"skipped a damaged checkpoint: {why}", QfleetWarning, stacklevel=2)
    return Policy(net, cfg, device, source, seed)


def save_policy(policy: Policy, folder: Path) -> None:
    """Write ``policy`` as model.safetensors + config.toml (what load_policy reads back)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.net.state_dict().items()}
    save_file(state, str(folder / MODEL_FILE), metadata={"format": FORMAT,
                                                         "env_id": policy.config.env.id})
    (folder / CONFIG_FILE).write_text(to_toml(policy.config))
