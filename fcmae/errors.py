"""The errors a user's own mistake raises. The scripts print their one-line message and exit with status 2.

A module of its own so that every layer (model config, training config, data, checkpoints) can raise them
without importing another.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(ValueError):
    """A bad value, key, file or folder given by the user; its message is one line that names the fix."""


class ConfigError(UserError):
    """A bad config value, key or file; the scripts print its one-line message and exit."""
