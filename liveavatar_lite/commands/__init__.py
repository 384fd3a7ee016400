"""One module per CLI subcommand: `register(subparsers)` adds its parser, `run(args) -> int` runs it.

Modules here import only argparse at import time; heavy imports happen inside `run`, so
`liveavatar-lite --help` stays fast and `quantize`/`calibration` load only for their subcommand.
"""
