"""qfleet: parallel deep Q-networks (and actor-critic siblings) from one config."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qfleet.callbacks import Callback
    from qfleet.config import Config, ConfigError, load_config
    from qfleet.experiment import Interrupted, Result, resume, train
    from qfleet.policy_io import Policy, load_policy

__all__ = ["Callback", "Config", "ConfigError", "Interrupted", "Policy", "Result", "load_config",
           "load_policy", "resume", "train"]
__version__ = "0.1.0"

# Loaded on first use, so `qfleet --help` (and a Ctrl-C at start-up) need not wait for torch.
_HOME = {"Config": "qfleet.config", "ConfigError": "qfleet.config",
         "load_config": "qfleet.config", "Interrupted": "qfleet.experiment",
         "Result": "qfleet.experiment", "resume": "qfleet.experiment",
         "train": "qfleet.experiment", "Policy": "qfleet.policy_io",
         "load_policy": "qfleet.policy_io", "Callback": "qfleet.callbacks"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'qfleet' has no attribute {name!r}")
