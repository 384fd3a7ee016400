"""`liveavatar-lite plan` (not implemented yet)."""
from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("liveavatar-lite plan: not implemented yet", file=sys.stderr)
    return 2
