"""The errors the commands answer with a one-line message and exit status 2: a user's own mistake, and a run
that cannot go on.

A module of its own so that every layer (model config, training config, data, checkpoints) can raise them
without importing another.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "TrainingError"]


class UserError(ValueError):
    """A bad value, key, file or folder given by the user; its message is one line that names the fix."""


class ConfigError(UserError):
    """A bad config value, key or file; the scripts print its one-line message and exit."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""
