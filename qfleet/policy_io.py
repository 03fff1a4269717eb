"""Load a trained policy (Q-network or actor-critic) from a run directory or checkpoint
(safetensors + JSON only)."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from qfleet import checkpoint
from qfleet.algos import build_program
from qfleet.config import Config, QfleetWarning


def _load_net(ckpt: Path) -> tuple[nn.Module, Config]:
    from qfleet.experiment import saved_config

    tensors, meta, _ = checkpoint.load(ckpt)
    cfg = saved_config(ckpt, meta)
    net = build_program(cfg).make_eval_net()  # the scheme's network, without its roles
    try:
        net.load_state_dict(checkpoint.with_prefix(tensors, "online."))
    except RuntimeError as err:
        raise checkpoint.CheckpointError(f"{ckpt}: the saved network does not match its "
                                         f"config ({str(err).splitlines()[0]})") from None
    return net.eval(), cfg


def load_policy(path: Path) -> tuple[nn.Module, Config]:
    """The online network of the newest loadable checkpoint under ``path`` and the run's
    config (a damaged newer checkpoint is skipped with a warning)."""
    (net, cfg), _, skipped = checkpoint.first_loadable(path, _load_net)
    for why in skipped:
        warnings.warn(f"skipped a damaged checkpoint: {why}", QfleetWarning, stacklevel=2)
    return net, cfg
