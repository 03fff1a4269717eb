"""Load a trained Q-network from a run directory or checkpoint (safetensors + JSON only)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from torch import nn

from qfleet import checkpoint
from qfleet.config import Config, from_dict
from qfleet.envs import box_space, make_vec_env
from qfleet.nets import make_q_network


def load_policy(path: Path) -> tuple[nn.Module, Config]:
    """The online network of the latest checkpoint under ``path`` and the run's config."""
    ckpt = checkpoint.find(path)
    tensors, meta, _ = checkpoint.load(ckpt)
    cfg = from_dict(tomllib.loads(meta["config"]))
    probe = make_vec_env(cfg.env, num_envs=1)
    obs_shape, _ = box_space(probe)
    num_actions = int(probe.single_action_space.n)  # type: ignore[attr-defined]
    probe.close()
    net = make_q_network(cfg.net, obs_shape, num_actions)
    prefix = "online."
    net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return net.eval(), cfg
