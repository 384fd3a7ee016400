"""Measure every DiT Linear's output error under each candidate format, one streaming unit at a time.

The reference generation (liveavatar_lite.pipeline.generator.CausalGenerator: sink prefill, then block 0 of
clip 0 through all 4 steps) runs with a stand-in for the DiT's units: each `forward_unit(i)` reads
unit i's weights from the checkpoint (LoRA merged in fp32), runs it, and frees them again, so only
the resident weights plus ONE unit are in memory: it fits the CPU or a small GPU. While unit i runs,
forward hooks see each Linear's real input x and output y; for every candidate format the weight is
quantized and dequantized (quantize.quantizers + liveavatar_lite.artifact.qtypes) and
rel_mse = sum((x W_q^T + b - y)^2) / sum(y^2) is accumulated.

    m = measure(ck, preset_for_dit(ck.dit_config), LoraWeights.open(l), [QuantType.INT8, QuantType.INT4], samples)
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from liveavatar_lite.artifact.checkpoint import (
    CheckpointDir,
    LoraWeights,
    check_keys,
    expected_shapes,
)
from liveavatar_lite.artifact.dit_loading import build_meta_dit, merged_dit_tensor
from liveavatar_lite.artifact.qtypes import QuantType, dequantize, stored_nbytes
from liveavatar_lite.config import ModelPreset, SampleConfig
from liveavatar_lite.model.dit import WanS2VDiT
from liveavatar_lite.model.units import resident_keys, unit_keys
from liveavatar_lite.pipeline.generator import (
    CausalGenerator,
    GenerationInputs,
    LocalRunner,
)
from quantize.policy import Policy, quantizable
from quantize.quantizers import quantize_tensor

from .inputs import CalibrationSample, build_conditioning
from .measurement import FormatError, LayerMeasurement, Measurement

log = logging.getLogger(__name__)
MAX_ROWS_PER_CALL = 1024  # activation rows kept per Linear call (evenly strided): bounds the cost


@dataclass
class _Accumulator:
    shape: tuple[int, ...]
    rows: int = 0
    sq_ref: float = 0.0
    sq_err: dict[QuantType, float] = field(default_factory=dict)


class LinearMeter:
    """Accumulates, per Linear key and format, squared output error against the reference output."""

    def __init__(self, formats: Sequence[QuantType], group_size: int, keys: set[str]) -> None:
        self.formats, self.group_size, self.keys = tuple(formats), group_size, keys
        self.acc: dict[str, _Accumulator] = {}

    def _group(self, q: QuantType) -> int | None:
        return self.group_size if q is QuantType.INT4 else None

    @contextmanager
    def watch(self, named_linears: dict[str, nn.Linear]) -> Iterator[None]:
        """Hook these Linears (key -> module) for the duration of one unit's forward."""
        handles = []
        for key, lin in named_linears.items():
            w = lin.weight.detach()
            w_q = {q: dequantize(q, quantize_tensor(q, w.float(), self._group(q)), tuple(w.shape), self._group(q), torch.float32) for q in self.formats}
            handles.append(lin.register_forward_hook(self._hook(key, lin, w_q)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, key: str, lin: nn.Linear, w_q: dict[QuantType, Tensor]):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # [rows, K]
            y = out.reshape(-1, out.shape[-1])  # [rows, N]
            step = max(1, x.shape[0] // MAX_ROWS_PER_CALL)
            x, y = x[::step].float(), y[::step].double()
            acc = self.acc.setdefault(key, _Accumulator(tuple(lin.weight.shape)))
            acc.rows += x.shape[0]
            acc.sq_ref += float(y.pow(2).sum())
            bias = None if lin.bias is None else lin.bias.float()
            for q, w in w_q.items():
                err = F.linear(x, w, bias).double() - y
                acc.sq_err[q] = acc.sq_err.get(q, 0.0) + float(err.pow(2).sum())

        return hook

    def layers(self) -> dict[str, LayerMeasurement]:
        out = {}
        for key, acc in sorted(self.acc.items()):
            ref = max(acc.sq_ref, 1e-30)
            formats = {QuantType.BF16: FormatError(0.0, stored_nbytes(QuantType.BF16, acc.shape))}
            formats.update({q: FormatError(acc.sq_err[q] / ref, stored_nbytes(q, acc.shape, self._group(q))) for q in self.formats})
            out[key] = LayerMeasurement(acc.shape, acc.rows, formats)
        return out


class MeasuredUnits:
    """Stands in for the DiT inside LocalRunner: `forward_unit(i)` loads unit i, measures it, frees it."""

    def __init__(self, dit: WanS2VDiT, ck: CheckpointDir, lora: LoraWeights | None, meter: LinearMeter) -> None:
        self.dit, self.ck, self.lora, self.meter = dit, ck, lora, meter
        self.cfg = dit.cfg
        self.compute_device = dit.compute_device
        self._expected = expected_shapes(dit)

    def forward_unit(self, i: int, x: Tensor, ctx: Any, kv: Any) -> Tensor:
        keys = unit_keys(self.cfg, i)
        tensors = {k: merged_dit_tensor(self.ck, self.lora, k, self.dit.compute_dtype) for k in keys}
        check_keys({k: self._expected[k] for k in keys}, {k: tuple(t.shape) for k, t in tensors.items()}, str(self.ck.path))
        self.dit.load_state_dict(tensors, strict=False, assign=True)
        block, inject = self.dit.unit_modules(i)
        modules = [block, *(inject or ())]
        prefix = {id(m): p for m, p in zip(modules, self._prefixes(i))}
        linears = {
            f"{prefix[id(m)]}{name}.weight": lin
            for m in modules
            for name, lin in m.named_modules()
            if isinstance(lin, nn.Linear) and f"{prefix[id(m)]}{name}.weight" in self.meter.keys
        }
        with self.meter.watch(linears):
            y = self.dit.forward_unit(i, x, ctx, kv)
        for m in modules:
            m.to(device="meta")  # release unit i: only resident weights + one unit stay in memory
        return y

    def _prefixes(self, i: int) -> list[str]:
        j = self.dit.inject_slot(i)
        out = [f"blocks.{i}."]
        if j is not None:
            out += [f"audio_injector.injector_adain_layers.{j}.", f"audio_injector.injector.{j}."]
        return out


def source_identity(ck: CheckpointDir, lora: LoraWeights | None) -> dict[str, str]:
    from liveavatar_lite.artifact import checkpoint as c

    ident = {"config_sha256": hashlib.sha256((ck.path / c.DIT_CONFIG).read_bytes()).hexdigest()}
    index = ck.path / c.DIT_INDEX
    if index.exists():
        ident["index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()
    if lora is not None:
        ident["lora"] = lora.path.name
    return ident


@torch.no_grad()
def measure(
    ck: CheckpointDir,
    preset: ModelPreset,
    lora: LoraWeights | None,
    formats: Sequence[QuantType],
    samples: Sequence[CalibrationSample],
    group_size: int = 128,
    blocks: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: bool = True,
) -> Measurement:
    """Run the calibration and return the per-Linear measurement (see module docstring)."""
    inputs: list[GenerationInputs] = build_conditioning(ck, preset, samples, dtype)
    dit = build_meta_dit(ck)
    if lora is not None:
        lora.check_targets(expected_shapes(dit))
    resident = {k: merged_dit_tensor(ck, lora, k, dtype) for k in resident_keys(ck.dit_config)}
    dit.load_state_dict(resident, strict=False, assign=True)
    shapes = {k: ck.dit_tensor_info(k).shape for k in ck.dit_keys}
    candidates = set(quantizable(Policy(QuantType.INT8, group_size), shapes))
    # resident Linears (audio encoder, embeddings) are kept bf16 by the policy; only unit Linears are measured
    meter = LinearMeter(formats, group_size, candidates)
    units = MeasuredUnits(dit, ck, lora, meter)
    sample_cfg = SampleConfig()
    bar = tqdm(total=len(inputs) * blocks, desc="calibration blocks", unit="block", disable=not progress)
    for inp in inputs:
        h, w = inp.ref_latents.shape[-2:]
        ring_tokens = sample_cfg.latent_frames_per_clip * (h // 2) * (w // 2)
        runner = LocalRunner(units, sample_cfg.num_steps, ring_tokens, dtype)  # type: ignore[arg-type]
        gen = CausalGenerator(dit, inp, seed=seed, runner=runner, num_clips=1)
        for _ in range(min(blocks, gen.total_blocks)):
            gen.next_block()
            bar.update(1)
    bar.close()
    log.info("measured %d Linears x %d formats on %d samples", len(meter.acc), len(formats), len(samples))
    return Measurement(
        dit_config=ck.dit_config,
        source=source_identity(ck, lora),
        group_size=group_size,
        samples=tuple(s.name for s in samples),
        blocks=blocks,
        layers=meter.layers(),
    )
