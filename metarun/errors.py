"""Errors that reach the user as one line and an exit code.

Anything raised as a :class:`MetarunError` is printed by the CLI as a single
line (no traceback unless ``--debug`` or ``HYDRA_FULL_ERROR=1``), because the
user can act on the message; every other exception is a bug and keeps its
traceback.
"""


class MetarunError(Exception):
    """A failure at run time the user can fix (exit 1)."""

    exit_code = 1


class ConfigError(MetarunError):
    """A usage or configuration error (exit 2)."""

    exit_code = 2


class DataError(MetarunError):
    """Data that is missing, corrupt or unreadable (exit 1)."""


class CheckpointError(MetarunError):
    """A checkpoint that is missing, truncated or does not match the config (exit 1)."""
