"""The errors and warnings a user sees, at the bottom of the import graph (every layer may
raise them; they import nothing of qfleet)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake; the CLI prints it and exits with code 2."""


class QfleetWarning(UserWarning):
    """Something a user should know that does not stop the command (the CLI prints it as
    one line)."""


class QfleetFailure(RuntimeError):
    """A command could not do its job for a reason that is neither the user's input nor a
    bug in qfleet (an exported model that disagrees with PyTorch, an upload the Hub
    refused): the CLI prints it as one line and exits with code 1."""
