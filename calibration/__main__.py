"""`python -m calibration CKPT_DIR --out measurement.json` (same flags as `liveavatar-lite calibrate`)."""
from __future__ import annotations

import argparse
import logging
import sys

from liveavatar_lite.commands import calibrate_cmd
from liveavatar_lite.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration", description=calibrate_cmd.DESCRIPTION)
    calibrate_cmd.register(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return calibrate_cmd.run(args)
    except UserError as e:
        print(f"calibrate: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
