"""Load a trained Q-network from a run directory or checkpoint (safetensors + JSON only)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from torch import nn

from qfleet import checkpoint
from qfleet.config import Config, from_dict
from qfleet.envs import probe_spaces
from qfleet.nets import make_q_network


def load_policy(path: Path) -> tuple[nn.Module, Config]:
    """The online network of the latest checkpoint under ``path`` and the run's config."""
    ckpt = checkpoint.find(path)
    tensors, meta, _ = checkpoint.load(ckpt)
    cfg = from_dict(tomllib.loads(meta["config"]))
    obs_shape, _, num_actions = probe_spaces(cfg.env)
    net = make_q_network(cfg.net, obs_shape, num_actions)
    net.load_state_dict(checkpoint.with_prefix(tensors, "online."))
    return net.eval(), cfg
