"""`--target-size GB`: per-layer formats that make the DiT's files fit, from a measurement.json.

The measured Linears get formats from `calibration.select.pick_formats` (greedy by error saved per
byte) within what the target leaves after every other DiT tensor (stored as the policy says) and
the per-part alignment padding are counted.

    plan = plan_for_target(ckpt, Path("measurement.json"), 12e9, QuantType.INT4, 128, ())
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from liveavatar_lite.artifact.checkpoint import CheckpointDir
from liveavatar_lite.artifact.format import ALIGN, TensorSpec, file_sha256, layout_file
from liveavatar_lite.artifact.qtypes import QuantType, part_specs
from liveavatar_lite.errors import UserError, gb_pair

from .policy import DIT_KEEP, Policy
from .source import DitSource


@dataclass(frozen=True)
class TargetPlan:
    overrides: tuple[tuple[str, QuantType], ...]
    total_bytes: int  # predicted size of the DiT files
    measurement_sha256: str

    def describe(self) -> str:
        mix = Counter(q.value for _, q in self.overrides)
        return ", ".join(f"{n} x {q}" for q, n in sorted(mix.items()))


def _stored_bytes(qtype: QuantType, shape: tuple[int, ...], group: int | None) -> int:
    """Bytes with each part padded to the 64-byte alignment the files use."""
    return sum(p.nbytes + (-p.nbytes % ALIGN) for p in part_specs(qtype, shape, group))


def _exact_total(src: DitSource, policy: Policy) -> int:
    """Bytes of every DiT unit file (headers and padding included) under `policy`."""
    units, resident = src.units()
    total = 0
    for name, keys in [(n, ks) for n, _, ks in units] + [("resident", resident)]:
        specs = []
        for k in keys:
            qtype, group = policy.decide(k, tuple(src.shapes[k]))
            specs.append(TensorSpec(k, qtype, tuple(src.shapes[k]), group, "BF16"))
        layout = layout_file(specs, name)
        total += len(layout.header) + layout.data_nbytes
    return total


def plan_for_target(ckpt_dir: Path, measurement_path: Path, target_bytes: float, fmt: QuantType,
                    group_size: int, keep_bf16: tuple[str, ...]) -> TargetPlan:
    """Per-layer formats for the measured Linears so that the DiT's files total <= target_bytes."""
    from calibration.measurement import read_measurement
    from calibration.select import pick_formats

    ck = CheckpointDir(ckpt_dir)
    src = DitSource(ck)
    m = read_measurement(measurement_path)
    if m.dit_config != ck.dit_config:
        raise UserError(f"{measurement_path}: measured on a different model config than {ckpt_dir}")
    if m.group_size != group_size and any(QuantType.INT4 in layer.formats for layer in m.layers.values()):
        raise UserError(f"{measurement_path}: measured with int4 group size {m.group_size}, not --group-size {group_size}")
    policy = Policy(fmt, group_size, DIT_KEEP, keep_bf16)
    unknown = [k for k in m.layers if k not in src.shapes]
    if unknown:
        raise UserError(f"{measurement_path}: layer {unknown[0]!r} is not in the checkpoint")
    # layers the user keeps in bf16 stay out of the search
    measured = {k: v for k, v in m.layers.items() if not policy.is_kept(k)}
    fixed = 0
    for key, shape in src.shapes.items():
        if key not in measured:
            qtype, group = policy.decide(key, shape)
            fixed += _stored_bytes(qtype, shape, group)
    # pick_formats counts bare tensor bytes: reserve padding (<= 3 parts per layer) and file headers,
    # then correct with the exact size of the files the choice would produce
    budget = int(target_bytes) - fixed - 3 * ALIGN * len(measured)
    if budget <= 0:
        need, have = gb_pair(fixed + 3 * ALIGN * len(measured), target_bytes)
        raise UserError(f"--target-size {have} is below the {need} of tensors that are never quantized "
                        "(and the measured layers' padding)")
    sub = type(m)(m.dit_config, m.source, m.group_size, m.samples, m.blocks, measured)
    for _ in range(8):
        choice = pick_formats(sub, budget)
        total = _exact_total(src, Policy(fmt, group_size, DIT_KEEP, keep_bf16, choice))
        if total <= target_bytes:
            break
        used = sum(measured[k].formats[q].bytes for k, q in choice.items())
        budget = used - int(total - target_bytes)  # below what this choice used, so the next one differs
    else:
        raise UserError(f"--target-size {target_bytes / 1e9:.3f} GB: no per-layer choice fits")
    return TargetPlan(tuple(sorted(choice.items())), total, file_sha256(measurement_path))
