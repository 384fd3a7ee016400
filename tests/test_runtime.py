"""The runtime on the tiny model: streamed output == resident output, bit for bit, for several budgets."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench_kv_accuracy import TIMESTEPS, synthetic_inputs
from bench_kv_accuracy import run_blocks as _run

from liveavatar_lite.artifact.format import read_manifest
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import PRESETS
from liveavatar_lite.errors import ArtifactError
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.dit_runtime import DiTRuntime
from liveavatar_lite.runtime.plan import Budget, make_plan, min_vram_bytes
from liveavatar_lite.runtime.plan_inputs import manifest_unit_sizes, plan_input

CFG = PRESETS["tiny"].dit
SIZE = (64, 64)  # latents 8 x 8: 16 tokens per frame, 48 per block
PROFILE = get_profile("rtx4090")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from quantize_fixtures import write_dit_checkpoint

    from quantize.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("rt")
    ck = write_dit_checkpoint(root / "ck")
    out = {}
    for fmt in ("int8", "int4"):
        convert(ConvertOptions(ck, root / fmt, QuantType(fmt), components=("dit",), progress=False))
        out[fmt] = root / fmt
    return out


def _budget(vram: float, kv: str = "bf16", ram: float | None = None) -> Budget:
    return Budget(vram_bytes=vram, ram_bytes=ram, kv_dtype=kv, cuda_context_bytes=0, vae_arena_bytes=0,
                  host_baseline_bytes=0)


def _plans(art: Path, kv: str) -> list:
    """Plans from 'everything on the GPU' down to the leanest layout (all streamed, KV on the host)."""
    inp = plan_input(CFG, SIZE, "int8", unit_sizes=manifest_unit_sizes(read_manifest(art)))
    lo = min_vram_bytes(inp, _budget(1, kv))
    plans = [make_plan(inp, _budget(v, kv), PROFILE) for v in (lo * 20, lo * 1.6, lo * 1.25, lo * 1.001)]
    host_kv = sum(k.nbytes for k in plans[-1].kv)
    plans.append(make_plan(inp, _budget(lo * 1.001, kv, ram=host_kv + 3e6), PROFILE))  # weights read from disk
    return plans


def _inputs(seed: int = 0) -> dict:
    return synthetic_inputs(CFG, SIZE, blocks=5, seed=seed)


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_streamed_equals_resident_bit_for_bit(artifacts, kv):
    plans = _plans(artifacts["int8"], kv)
    assert not plans[0].streamed_units and all(k.placement == "gpu" for k in plans[0].kv)
    assert len(plans[-2].streamed_units) == CFG.num_layers and all(k.placement == "host" for k in plans[-2].kv)
    assert {u.placement for u in plans[-1].streamed_units} == {"disk"}
    inp = _inputs()
    want = _run(DiTRuntime.from_artifact(artifacts["int8"], plans[0], device="cpu"), inp, blocks=5)
    assert all(torch.isfinite(v).all() for v in want)
    for plan in plans[1:] if kv == "bf16" else plans[-1:]:  # fp8: the leanest layout only (time)
        rt = DiTRuntime.from_artifact(artifacts["int8"], plan, device="cpu")
        got = _run(rt, inp, blocks=5)
        for a, b in zip(got, want):
            assert torch.equal(a, b), [u.placement for u in plan.units]
        if plan.streamed_units:  # each streamed unit copied once per pass (+1: the prefetch after the last)
            n, passes = len(plan.streamed_units), 1 + 5 * 4  # sink prefill + 5 blocks x 4 steps
            expected = n * passes if n > 2 else n  # <= 2 streamed units simply stay in the two slots
            assert expected <= rt.weights.streamer.stats.copies <= expected + 1


def test_int4_artifact_runs_streamed(artifacts):
    inp_plan = plan_input(CFG, SIZE, "int4", unit_sizes=manifest_unit_sizes(read_manifest(artifacts["int4"])))
    lo = min_vram_bytes(inp_plan, _budget(1))
    plan = make_plan(inp_plan, _budget(lo * 1.01), PROFILE)
    resident = make_plan(inp_plan, _budget(lo * 20), PROFILE)
    inp = _inputs(1)
    a = _run(DiTRuntime.from_artifact(artifacts["int4"], plan, device="cpu"), inp, blocks=2)
    b = _run(DiTRuntime.from_artifact(artifacts["int4"], resident, device="cpu"), inp, blocks=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_matches_plain_model_with_resident_caches(artifacts):
    """The runtime's loop == WanS2VDiT.forward with kv_cache.py's caches and dequantized weights."""
    from liveavatar_lite.runtime.kv_cache import RingKVCache, SinkKVCache, layer_kv

    plans = _plans(artifacts["int8"], "bf16")
    rt = DiTRuntime.from_artifact(artifacts["int8"], plans[-2], device="cpu")
    ref_rt = DiTRuntime.from_artifact(artifacts["int8"], plans[0], device="cpu")  # all resident: a plain model
    inp = _inputs(2)
    got = _run(rt, inp, blocks=2)
    dit = ref_rt.dit
    tpf = (SIZE[0] // 16) * (SIZE[1] // 16)
    rings = [RingKVCache(CFG.num_layers, 12 * tpf, CFG.num_heads, CFG.head_dim) for _ in range(4)]
    sink = SinkKVCache(CFG.num_layers)
    with torch.no_grad():
        text = dit.embed_text(inp["text"])
        x, ctx = dit.prepare_sink(inp["ref"], inp["motion"], text)
        dit.forward(x, ctx, lambda i: layer_kv(None, sink, i))
        want = []
        for b in range(2):
            lat = inp["latents"][b]
            for step, t in enumerate(TIMESTEPS):
                x, ctx = dit.prepare_block(lat, t, 3 * b, inp["audio"][b], text, 7)
                rings[step].begin(3 * b * tpf, x.shape[1])
                v = dit.forward(x, ctx, lambda i, s=step: layer_kv(rings[s], sink, i))
                want.append(v)
                lat = (lat.float() - 0.2 * v.float()).to(lat.dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_plan_must_place_every_unit(artifacts):
    plan = _plans(artifacts["int8"], "bf16")[0]
    broken = replace(plan, units=plan.units[1:])
    with pytest.raises(ArtifactError, match="does not place unit"):
        DiTRuntime.from_artifact(artifacts["int8"], broken, device="cpu")
