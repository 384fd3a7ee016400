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


def gb_pair(need_bytes: float, have_bytes: float, decimals: int = 3) -> tuple[str, str]:
    """("X GB", "Y GB") for an error that says `need` does not fit in `have`, never contradicting itself.

    `need` is rounded up and `have` down, with as many decimals as it takes for a larger `need` to
    print larger: gb_pair(2_400_000, 2_100_000) == ("0.003 GB", "0.002 GB"), never "0.002 ... 0.002";
    gb_pair(24.04e9, 23.96e9, decimals=1) == ("24.1 GB", "23.9 GB").
    """
    import math

    for d in range(decimals, 10):
        scale = 10 ** d
        need = math.ceil(need_bytes / 1e9 * scale - 1e-9) / scale
        have = math.floor(have_bytes / 1e9 * scale + 1e-9) / scale
        if need_bytes <= have_bytes or need > have:
            break
    return f"{need:.{d}f} GB", f"{have:.{d}f} GB"
