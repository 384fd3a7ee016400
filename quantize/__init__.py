"""Offline converter: upstream checkpoint -> quantized, streamable liveavatar-lite artifact."""
