"""Which QuantType each tensor gets: keep-high-precision rules, the chosen format, per-layer overrides.

Only 2-D `.weight` tensors of Linear layers are ever quantized. Norms, modulation tables, biases,
convolutions and embeddings stay in high precision, and so do the Linears upstream's own FP8 path
skips (text/time embeddings, time_projection, the head, the audio encoder's final linear).

    policy = Policy(QuantType.INT4, group_size=128, keep_bf16=("blocks.0.*",))
    qtype, group = policy.decide("blocks.3.ffn.0.weight", (13824, 5120))
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from liveavatar_lite.artifact.qtypes import QuantType, check_quantizable

log = logging.getLogger(__name__)

# DiT Linears upstream keeps in bf16 (LIVEAVATAR.md §1.1 FP8 path `ignore_keys`), plus the cond-mask embedding.
DIT_KEEP: tuple[str, ...] = (
    "text_embedding.*",
    "time_embedding.*",
    "time_projection.*",
    "head.*",
    "casual_audio_encoder.encoder.final_linear.*",
    "trainable_cond_mask.*",
)
# umT5: the token table and the relative-position tables are embeddings, not Linears.
T5_KEEP: tuple[str, ...] = ("token_embedding.*", "*pos_embedding*")


@dataclass(frozen=True)
class Policy:
    """A format for quantizable Linears, what stays high precision, and per-key overrides."""

    format: QuantType
    group_size: int = 128
    keep: tuple[str, ...] = DIT_KEEP
    keep_bf16: tuple[str, ...] = ()  # user globs (--keep-bf16), added to `keep`
    overrides: Mapping[str, QuantType] = field(default_factory=dict)  # from --target-size
    passthrough: QuantType = QuantType.BF16  # what "high precision" means here (bf16; fp32 for the VAE)

    def is_kept(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, g) for g in (*self.keep, *self.keep_bf16))

    def decide(self, key: str, shape: tuple[int, ...]) -> tuple[QuantType, int | None]:
        """(qtype, group size or None) for one tensor."""
        linear = key.endswith(".weight") and len(shape) == 2
        if not linear or self.is_kept(key):
            return self.passthrough, None
        qtype = self.overrides.get(key, self.format)
        if not qtype.is_quantized:
            return qtype, None
        group = self.group_size if qtype is QuantType.INT4 else None
        why = check_quantizable(qtype, shape, group)
        if why:
            log.warning("%s stays %s: %s", key, self.passthrough.value, why)
            return self.passthrough, None
        return qtype, group


def quantizable(policy: Policy, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Keys a policy with a quantized format would quantize (the calibration candidates)."""
    probe = Policy(QuantType.INT8, policy.group_size, policy.keep, policy.keep_bf16)
    return [k for k, s in shapes.items() if probe.decide(k, s)[0] is QuantType.INT8]
