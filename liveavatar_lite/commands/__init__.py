"""The CLI's subcommands, one module each: `register(parser)` adds its flags, `run(args) -> int` runs it.

Modules here import only argparse at import time; heavy imports happen inside `run`, so
`liveavatar-lite --help` stays fast and `quantize`/`calibration` load only for their subcommand.

May import: every stage, and (lazily, inside `run`) the `quantize` and `calibration` packages.
"""
