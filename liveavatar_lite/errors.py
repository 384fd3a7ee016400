"""User-facing errors: one line on stderr, a non-zero exit code, no traceback.

Library code raises these for bad input; `cli.main` turns them into exit codes.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or an impossible request. The message is shown as-is (one line)."""

    exit_code = 2


class CheckpointError(UserError):
    """An upstream checkpoint directory is missing, corrupt or does not match the model."""


class ArtifactError(UserError):
    """A liveavatar-lite artifact is missing, corrupt, incomplete or of an unknown version."""


class BudgetError(UserError):
    """A memory budget cannot hold the plan; the message names the smallest change that fits."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
