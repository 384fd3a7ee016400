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


def test_measured_bytes_are_the_plans(artifacts):
    """What the runtime allocates is what the plan counted, to the byte: device parts (resident
    weights, slots, KV) and the host buffers (exact size: no power-of-two rounding), for every budget."""
    from liveavatar_lite.runtime.pinned import host_buffer_bytes

    for plan in _plans(artifacts["int8"], "fp8"):
        before = host_buffer_bytes()
        rt = DiTRuntime.from_artifact(artifacts["int8"], plan, device="cpu")
        dev, host = rt.device_bytes(), rt.host_bytes()
        for part in ("resident_weights", "weight_slots", "gpu_kv", "kv_slots"):
            assert dev[part] == plan.breakdown[part], part
        assert {k: v for k, v in host.items() if v} == {k: v for k, v in plan.host_breakdown.items()
                                                         if k != "baseline" and v}
        assert host_buffer_bytes() - before == plan.pinned_host_bytes
        del rt


def test_checkpoint_state_is_the_live_host_kv_without_a_copy(artifacts, tmp_path):
    """A resume checkpoint reads the host KV buffers in place (a copy was 22.5-43.7 GB at 14B) and
    the saved file holds the caches' bytes, not the streamed weights next to them."""
    plan = _plans(artifacts["int8"], "fp8")[-2]  # every unit streamed, every KV cache on the host
    rt = DiTRuntime.from_artifact(artifacts["int8"], plan, device="cpu")
    _run(rt, _inputs(), blocks=1)
    state = rt.kv_state()
    stores = [*rt.kv.rings, rt.kv.sink]
    for store, bufs in zip(stores, [*state["rings"], state["sink"]]):
        assert all(b.untyped_storage().data_ptr() == store.storage.untyped_storage().data_ptr() for b in bufs)
    torch.save(state, tmp_path / "kv.pt")
    kv_bytes = sum(s.nbytes for s in stores)
    assert kv_bytes <= (tmp_path / "kv.pt").stat().st_size <= kv_bytes + 64 * 1024


def test_copy_waits_and_bytes_split_into_weights_and_kv(artifacts):
    """KV copies are timed like weight copies (they were not): the counters split both."""
    plan = _plans(artifacts["int8"], "bf16")[-2]
    rt = DiTRuntime.from_artifact(artifacts["int8"], plan, device="cpu")
    _run(rt, _inputs(), blocks=1)
    c = rt.copy_counters()
    assert c["copy_wait_weights_s"] > 0 and c["copy_wait_kv_s"] > 0
    assert c["h2d_weights_bytes"] == rt.weights.streamer.stats.h2d_bytes
    assert c["h2d_kv_bytes"] == sum(st.stats.h2d_bytes for st in rt.kv.streamers()) > 0
    assert rt.copy_wait_seconds() == pytest.approx(c["copy_wait_weights_s"] + c["copy_wait_kv_s"])
    lay = rt.layout()
    assert len(lay["units_streamed"]) == CFG.num_layers and set(lay["kv_placement"].values()) == {"host"}


def test_rope_without_fp64_is_within_tolerance(artifacts):
    """complex64 RoPE (what the runtime uses in bf16 on a GPU: fp64 runs at 1/64 rate there) against
    upstream's fp64 rotation. Each bound is relative to a bf16 rounding the model applies anyway
    (LA rounds q/k/v to bf16 right after the rotation, model/dit_blocks.py `attend`; the bf16 KV
    store rounds k/v), never to one CPU's fp32 kernels, which decide which roundings flip.

    1. On a rotated q/k: complex64 multiplies the same fp16-valued factors by the same fp32 inputs
       in fp32, so it differs from the fp64 product rounded to fp32 by ~1 fp32 ulp (2^-24) where it
       differs at all, while a bf16 rounding moves values by up to 2^-9: the ratio r of the two
       changes is ~2^-15 (measured 2.1e-5). Bound: 1 %, and the same bf16 values almost everywhere.
    2. Through the DiT with LA's roundings off (fp32 but for the bf16 KV store): a change of
       delta ~ 2^-24 ahead of a bf16 rounding of step u ~ 2^-8 flips a fraction delta/u of the
       rounded values by u each, an RMS change of sqrt(delta u) = 2^-16; LA's own roundings change
       q/k/v by ~2^-9.5 RMS and move the outputs by E (1.3e-3 here). Propagated alike, the
       complex64 change moves the outputs by ~2^-6.5 E = E/90 at most (measured E/200 to E/320,
       seeds 0-6, 1 or 2 threads). Bound: E/16.
    3. Through the DiT as the runtime runs it (fp32 with LA's roundings): once a one-ulp change flips
       one bf16 rounding of q/k, the later roundings of the two runs decorrelate. Each run's outputs
       lie within ~E of the unrounded outputs (which differ by step 2's tiny amount), so by the
       triangle inequality the runs lie within ~2 E of each other on any CPU or thread count
       (measured: 0 when nothing flips, up to 0.8 E). Bound: 3 E; a wrong rotation moves them by O(1).
    """
    from liveavatar_lite.model.rope import RopeGrid, apply_rope, rope_factors
    from liveavatar_lite.runtime.dit_runtime import artifact_units

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 16 * 16, 4, 128, generator=g)
    f = rope_factors([RopeGrid.video(40, 3, 16, 16)], 128)
    exact, fast = apply_rope(x, f), apply_rope(x, f.to(torch.complex64))
    assert (fast - exact).norm() < 0.01 * (exact.bfloat16().float() - exact).norm()  # 1.
    assert (fast.bfloat16() != exact.bfloat16()).float().mean() < 0.01

    plan = _plans(artifacts["int8"], "bf16")[0]
    m = read_manifest(artifacts["int8"])
    inp = _inputs(3)
    outs = {}
    for fp64 in (True, False):
        for la in (True, False):
            rt = DiTRuntime(m.dit, artifact_units(artifacts["int8"], m, plan, pin=False), plan, "cpu",
                            compute_dtype=torch.float32, rope_fp64=fp64)
            rt.dit.la_roundings = la  # the model's flag, read by each prepare_*
            outs[fp64, la] = torch.cat([v.flatten() for v in _run(rt, inp, blocks=1)])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    e = rel(outs[True, True], outs[True, False])  # E: what LA's bf16 roundings move the outputs by
    assert 0 < e < 0.05
    assert rel(outs[False, False], outs[True, False]) < e / 16  # 2.
    assert rel(outs[False, True], outs[True, True]) < 3 * e  # 3.


def test_time_embedding_runs_once_per_timestep(artifacts, monkeypatch):
    """The fp32 time MLP (629 MB of time_projection weight read as fp32 at 14B) runs once per
    timestep, not once per denoising call; the cached embedding is the computed one."""
    plan = _plans(artifacts["int8"], "bf16")[0]
    rt = DiTRuntime.from_artifact(artifacts["int8"], plan, device="cpu", compute_dtype=torch.float32)
    calls = []
    real = rt.dit._time_mlp
    monkeypatch.setattr(rt.dit, "_time_mlp", lambda t: calls.append(1) or real(t))
    _run(rt, _inputs(), blocks=2)  # 2 blocks x 4 steps + the sink prefill
    assert len(calls) == len(TIMESTEPS) + 1
    _, ctx = rt.dit.prepare_block(torch.zeros(16, 3, 8, 8), TIMESTEPS[1], 0, torch.zeros(CFG.audio_layers, CFG.audio_dim, 12),
                                  rt.embed_text(torch.zeros(4, CFG.text_dim)), 7)
    e, e0 = real(torch.cat([torch.full((3,), float(TIMESTEPS[1])), torch.zeros(3)]))
    assert torch.equal(ctx.e0, e0[:3]) and torch.equal(ctx.e_head, e[:3])
