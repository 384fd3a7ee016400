"""argparse types for numeric flags: a bad value is one line naming the flag's rule, never a traceback.

Every numeric flag of every subcommand uses one of these, so `--vram nan`, `--seed 1e30` or
`--samples 0` are refused while parsing, before any work (tests/test_hostile_inputs.py).

    parser.add_argument("--vram", type=positive_float, metavar="GB")
    parser.add_argument("--seed", type=seed)
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# Runtime choices the CLI offers, spelled here because commands import only argparse at module level;
# they equal runtime.device_profiles.ATTENTION_CHOICES / COMPILE_CHOICES / tuple(PROFILES)
# (tests/test_plan_cli.py checks it).
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "cudnn", "efficient", "math", "sage")
COMPILE_CHOICES = ("auto", "on", "off")
PROFILE_NAMES = ("rtx4090", "rtx3090", "rtx5090", "l40s", "h100-pcie", "h100")  # --device-profile's names

SEED_MAX = 2**63 - 1  # the noise of clip c is seeded `seed + c`: this leaves room below torch's 64-bit limit


def _number(convert: Callable[[str], float | int], rule: str, ok: Callable[[float | int], bool]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = convert(text.strip())
        except (ValueError, OverflowError):
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = rule  # argparse names the type in some messages
    return parse


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (no upper bound when hi is None)."""
    rule = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    return _number(int, rule, lambda v: v >= lo and (hi is None or v <= hi))  # type: ignore[return-value]


def float_range(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] ((lo, hi] with lo_open); nan and inf are always refused."""
    low = f"> {lo:g}" if lo_open else f">= {lo:g}"
    rule = f"a finite number {low}" + (f" and <= {hi:g}" if hi is not None else "")
    return _number(float, rule, lambda v: (v > lo if lo_open else v >= lo) and (hi is None or v <= hi))  # type: ignore[return-value]


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0.0, lo_open=True)
non_negative_float = float_range(0.0)
seed = int_range(0, SEED_MAX)
