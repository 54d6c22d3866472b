"""Error types that carry a user-facing message.

Every error a user can cause (a malformed config, a missing file, a bad dataset)
is raised as a `ConsortiaError`. The CLI turns it into one message and exit code
2; anything else is a bug and keeps its stack trace.
"""

from __future__ import annotations


class ConsortiaError(Exception):
    """Base class for errors caused by user input or the environment.

    Parameters
    ----------
    message : str
        What went wrong, where, and how to fix it, in one or a few lines.
    """

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ConsortiaError):
    """A configuration file cannot be read or does not validate."""


class DataError(ConsortiaError):
    """A dataset cannot be found, read or partitioned as asked."""


class FederationError(ConsortiaError):
    """A federated run cannot go on (for example: no node answered a round)."""


class PrivacyError(ConsortiaError):
    """A privacy requirement cannot be met (for example: an unreachable ε)."""
