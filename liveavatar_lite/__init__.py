"""liveavatar-lite: Live Avatar (Wan2.2-S2V-14B + LoRA) on one 24 GB GPU."""

__version__ = "0.1.0"
