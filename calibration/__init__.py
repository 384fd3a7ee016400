"""Calibration inputs and the per-layer measurement that picks quantization formats.

    inputs.py       a small, described calibration set: prompts, synthesized speech, procedural portraits
    measure.py      runs the reference DiT one streaming unit at a time and measures every Linear's
                    output error under each candidate format -> measurement.json
    measurement.py  the measurement.json format (versioned) and reading/writing it
    select.py       --target-size: greedy per-layer formats by error saved per byte
    cli.py          `liveavatar-lite calibrate` (the only entry: this offline package never imports the CLI)
"""
