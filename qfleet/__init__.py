"""qfleet: parallel deep Q-networks (and actor-critic siblings) from one config."""

from qfleet.config import Config, ConfigError, load_config
from qfleet.experiment import Interrupted, Result, resume, train

__all__ = ["Config", "ConfigError", "Interrupted", "Result", "load_config", "resume", "train"]
__version__ = "0.1.0"
