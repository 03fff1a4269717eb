"""Load a trained policy (Q-network or actor-critic) from a run directory or checkpoint
(safetensors + JSON only)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from torch import nn

from qfleet import checkpoint
from qfleet.algos import build_program
from qfleet.config import Config, from_dict


def load_policy(path: Path) -> tuple[nn.Module, Config]:
    """The online network of the latest checkpoint under ``path`` and the run's config."""
    ckpt = checkpoint.find(path)
    tensors, meta, _ = checkpoint.load(ckpt)
    cfg = from_dict(tomllib.loads(meta["config"]))
    net = build_program(cfg).make_eval_net()  # the scheme's network, without its roles
    net.load_state_dict(checkpoint.with_prefix(tensors, "online."))
    return net.eval(), cfg
