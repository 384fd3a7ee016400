"""Calibration inputs and the per-layer measurement that picks quantization formats."""
