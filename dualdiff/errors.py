"""The errors dualdiff raises for things that are not bugs, in one place.

The library raises these; :func:`dualdiff.cli.main` prints any :class:`UserError` (and the few
standard errors in :func:`user_error_types`) as one ``dualdiff: error: ...`` line and exits 2
(``--debug`` or ``DUALDIFF_DEBUG=1`` shows the traceback instead).

    UserError                 a mistake of the user's: bad option, missing file, unusable choice
    ├── ConfigError           a config key or value is invalid (also a ValueError); names the key
    ├── CheckpointError       a checkpoint is missing, unreadable, corrupt or incompatible (also a
    │                         RuntimeError); names the file
    └── DataError             a data file or folder cannot be used (also a ValueError); names the
                              file or folder

This module imports nothing from dualdiff, so every layer can import it without a cycle.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError", "CheckpointError", "DataError", "user_error_types"]


class UserError(Exception):
    """A mistake of the user's (not a bug): the CLI prints it as one line and exits 2."""


class ConfigError(UserError, ValueError):
    """A config key or value is invalid; the message names the key."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt or incompatible (message names it)."""


class DataError(UserError, ValueError):
    """A data file or folder cannot be used as configured (message names the file or folder)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports as one line and exit status 2."""
    from dualdiff._backend import BackendUnavailableError

    return (UserError, BackendUnavailableError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError)
