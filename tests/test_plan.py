"""The memory plan: pure, within budget, interleaved, and the 14B figures the project promises."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.decoder_memory import DecoderGraph
from liveavatar_lite.errors import BudgetError, UserError
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.plan import make_plan, min_vram_bytes
from liveavatar_lite.runtime.plan_inputs import (
    GB,
    Budget,
    KVSpec,
    PlanInput,
    UnitSize,
    Workload,
    parse_size,
    plan_input,
    synthesize_unit_sizes,
    workload,
)

RTX4090 = get_profile("rtx4090")
CFG14 = PRESETS["14b"].dit
DECODER14 = DecoderGraph.for_preset("14b")  # the fp16 ONNX decoder's shapes: its memory is in the plan


def _inp14(fmt: str, size: tuple[int, int] = (704, 384)):
    return plan_input(CFG14, size, fmt, decoder=DECODER14)


def _toy(n_layers: int, unit_bytes: list[int], ring_tokens: int, sink_tokens: int) -> PlanInput:
    units = (UnitSize("resident", 1000, None),) + tuple(
        UnitSize(f"block_{i:03d}", unit_bytes[i % len(unit_bytes)], i) for i in range(n_layers))
    kv = tuple(KVSpec(f"ring.{s}", s, n_layers, ring_tokens, 2, 128) for s in range(4)) + (
        KVSpec("sink", None, n_layers, sink_tokens, 2, 128),)
    wl = Workload(size=(64, 64), block_tokens=48, linear_flops=(1e9,) * n_layers, attn_flops=(1e9,) * n_layers,
                  activation_bytes=10_000, new_kv_layer_bytes_bf16=48 * 256 * 4)
    return PlanInput("int8", units, kv, wl)


def _small_budget(vram: float, **kw) -> Budget:
    return Budget(vram_bytes=vram, cuda_context_bytes=1000, vae_arena_bytes=1000, host_baseline_bytes=0, **kw)


def test_14b_int8_fits_24gb_with_peak_under_22_5():
    plan = make_plan(_inp14("int8"), Budget(vram_bytes=24 * GB), RTX4090)
    assert plan.peak_vram_bytes <= 22.5 * GB
    assert {k.placement for k in plan.kv if k.step is not None} == {"host"}  # 38.7 GiB of bf16 rings cannot stay on the card


def test_14b_int4_fits_12gb():
    plan = make_plan(_inp14("int4"), Budget(vram_bytes=12 * GB), RTX4090)
    assert plan.peak_vram_bytes <= 12 * GB * 0.93
    assert plan.streamed_units, "12 GB cannot hold 9 GB of int4 weights next to the fixed costs"


def test_14b_unit_sizes_match_reference(reference_dir):
    ref = json.loads((reference_dir / "wan22_s2v_14b_keys.json").read_text())
    bf16 = synthesize_unit_sizes(CFG14, "bf16")
    assert sum(u.nbytes for u in bf16) == 2 * ref["total_params"]
    int8 = sum(u.nbytes for u in synthesize_unit_sizes(CFG14, "int8"))
    assert abs(int8 / GB - 16.65) < 0.05  # LIVEAVATAR.md §2.3: 15.94 + 0.71 GB


def test_14b_workload_matches_reference_figures():
    wl = workload(CFG14, (704, 384))
    assert wl.block_tokens == 3168
    attn_self = sum(4 * 3168 * 15312 * 5120 for _ in range(40))
    assert abs(attn_self / 1e12 - 39.7) < 0.1
    kv = _inp14("int8").kv
    assert abs(sum(k.nbytes("bf16") for k in kv if k.step is not None) / 2**30 - 38.67) < 0.01


def test_interleaved_streaming():
    inp = _toy(8, [1_000_000], 16, 8)
    fixed = 1000 + 1000 + 10_000 + 1000
    kv_slot = 2 * inp.kv[0].layer_bytes("bf16") + 2 * inp.kv[-1].layer_bytes("bf16")
    # room for 5 resident units + 2 slots, KV on the host
    budget = _small_budget((fixed + kv_slot + 7 * 1_000_000 + 50) / 0.93)
    plan = make_plan(inp, budget, RTX4090)
    streamed = sorted(u.layer for u in plan.streamed_units)
    # 3 streamed with every KV cache on the host, or one more so that the (small) KV fits on the GPU
    assert len(streamed) == (3 if all(k.placement == "host" for k in plan.kv) else 4)
    assert all(b - a > 1 for a, b in zip(streamed, streamed[1:])), streamed  # never two in a row


def test_no_fit_names_smallest_change():
    inp = _inp14("int8")
    # leanest layouts (1-latent decoder calls, a dequantize's scratch and the 0.42 GB of text K/V
    # counted): int8 bf16 KV 10.42 GB, int8 fp8 KV 10.10 GB, int4 fp8 KV 9.58 GB
    with pytest.raises(BudgetError, match="smallest change that fits: --kv fp8"):
        make_plan(inp, Budget(vram_bytes=10.3 * GB), RTX4090)
    with pytest.raises(BudgetError, match="--format int4"):
        make_plan(inp, Budget(vram_bytes=9.9 * GB, kv_dtype="fp8"), RTX4090)
    with pytest.raises(BudgetError, match="--kv fp8"):  # host RAM too small for bf16 KV
        make_plan(inp, Budget(vram_bytes=24 * GB, ram_bytes=32 * GB), RTX4090)


def test_ram_limit_moves_weights_to_disk():
    inp = _toy(8, [100_000], 4, 4)
    kv_host = sum(k.nbytes("bf16") for k in inp.kv)
    vram = (13_000 + 4 * 100_000 + 2 * 100_000 + 4 * inp.kv[0].layer_bytes("bf16")) / 0.93
    roomy = make_plan(inp, _small_budget(vram), RTX4090)
    assert {u.placement for u in roomy.streamed_units} == {"host"}
    tight = make_plan(inp, _small_budget(vram, ram_bytes=kv_host + 2 * 100_000), RTX4090)
    assert {u.placement for u in tight.streamed_units} == {"disk"}
    assert tight.host_ram_bytes <= kv_host + 2 * 100_000


def test_plan_is_pure_and_json():
    inp = _inp14("int8")
    a = make_plan(inp, Budget(vram_bytes=16 * GB, kv_dtype="fp8"), RTX4090)
    b = make_plan(inp, Budget(vram_bytes=16 * GB, kv_dtype="fp8"), RTX4090)
    assert a == b
    d = json.loads(json.dumps(a.to_json()))
    for key in ("peak_vram_bytes", "host_ram_bytes", "h2d_bytes_per_clip", "predicted_seconds_per_clip"):
        assert key in d
    assert {"name", "nbytes", "placement"} <= set(d["units"][0])
    assert {"step", "dtype", "nbytes", "placement"} <= set(d["kv"][0])


def test_fp8_kv_moves_fewer_bytes_and_pays_for_its_dequantization():
    """fp8 KV halves the H2D traffic, but unfused it dequantizes the whole ring every layer: the plan's
    time counts those elementwise bytes (it used to count only the copies and call fp8 faster)."""
    inp = _inp14("int8")
    bf16 = make_plan(inp, Budget(vram_bytes=24 * GB), RTX4090)
    fp8 = make_plan(inp, Budget(vram_bytes=24 * GB, kv_dtype="fp8"), RTX4090)
    assert fp8.h2d_bytes_per_clip < bf16.h2d_bytes_per_clip
    assert fp8.seconds_breakdown["kv_copy_stall"] <= bf16.seconds_breakdown["kv_copy_stall"]
    assert fp8.seconds_breakdown["elementwise"] > bf16.seconds_breakdown["elementwise"]
    assert fp8.seconds_breakdown["gemm"] == bf16.seconds_breakdown["gemm"]


def test_bad_inputs():
    with pytest.raises(UserError, match="WIDTH\\*HEIGHT"):
        parse_size("big")
    with pytest.raises(UserError, match="multiples of 16"):
        parse_size("700*384")
    assert parse_size("704*384") == (704, 384)
    with pytest.raises(BudgetError, match="KV dtype"):
        make_plan(_toy(2, [10], 4, 4), _small_budget(1e9, kv_dtype="fp4"), RTX4090)
    with pytest.raises(UserError, match="device profile"):
        get_profile("gtx480")


@settings(max_examples=60, deadline=None)
@given(
    n_layers=st.integers(1, 12),
    unit_bytes=st.lists(st.integers(1_000, 2_000_000), min_size=1, max_size=4),
    ring=st.integers(1, 64),
    sink=st.integers(1, 32),
    vram=st.floats(1e4, 5e7),
    ram=st.one_of(st.none(), st.floats(1e4, 5e7)),
    kv_dtype=st.sampled_from(["bf16", "fp8", "int8"]),
)
def test_plan_never_exceeds_budget(n_layers, unit_bytes, ring, sink, vram, ram, kv_dtype):
    inp = _toy(n_layers, unit_bytes, ring, sink)
    budget = _small_budget(vram, ram_bytes=ram, kv_dtype=kv_dtype)
    try:
        plan = make_plan(inp, budget, RTX4090)
    except BudgetError:
        assert min_vram_bytes(inp, budget) > vram or ram is not None
        return
    assert plan.peak_vram_bytes <= vram * (1 - budget.reserve_frac)
    if ram is not None:
        assert plan.host_ram_bytes <= ram
    streamed = [u for u in plan.units if u.placement != "gpu"]
    assert all(u.layer is not None for u in streamed)  # the resident set never streams
    layers = sorted(u.layer for u in streamed)
    if 2 * len(layers) <= n_layers:  # at most half streamed: never two streamed units in a row
        assert all(b - a > 1 for a, b in zip(layers, layers[1:])), layers


def test_probe_profile_measures_this_machine():
    from liveavatar_lite.runtime.device_profiles import probe_profile

    prof = probe_profile("cpu", seconds=0.1)
    assert prof.h2d_gbps > 0 and prof.bf16_tflops > 0 and prof.name == "probe:cpu"
    assert prof.linear_tops("int8") > 0 and prof.attention_tflops() > 0
    assert prof.int4_tops > 0 and prof.linear_tops("int4") == prof.int4_tops  # the real int4 forward, measured


def test_a_measured_int4_rate_prices_int4_linears():
    """An H100 ran int4 linears (dequantize + bf16 GEMM) at ~0.35x of bf16 (2026-11-26), where the
    plan, pricing them at bf16's rate, predicted 6.8 s per clip for 10.3 s measured. A profile with a
    measured int4 rate prices them by it; named profiles (no measurement) keep bf16's rate."""
    inp = _inp14("int4")
    budget = Budget(vram_bytes=16 * GB, kv_dtype="fp8")
    base = make_plan(inp, budget, RTX4090)
    slow = make_plan(inp, budget, replace(RTX4090, int4_tops=RTX4090.bf16_tflops * 0.35))
    assert RTX4090.linear_tops("int4") == RTX4090.linear_tops("bf16")
    gemm = base.seconds_breakdown["gemm"]
    assert slow.seconds_breakdown["gemm"] == pytest.approx(gemm / 0.35, rel=1e-4)  # the breakdown is rounded
    assert slow.predicted_seconds_per_clip > base.predicted_seconds_per_clip


def test_unit_shape_table_matches_the_model():
    """plan_inputs.unit_shapes is a hand-written table (plan never builds the 14B model): it must list
    exactly the meta-built model's keys and shapes per streaming unit, quantizable = block Linears."""
    import torch
    from torch import nn

    from liveavatar_lite.artifact.format import block_unit_name
    from liveavatar_lite.model.dit import WanS2VDiT
    from liveavatar_lite.model.units import resident_keys, unit_keys
    from liveavatar_lite.runtime.plan_inputs import unit_shapes

    cfg = PRESETS["tiny"].dit
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    table = unit_shapes(cfg)
    groups = {"resident": resident_keys(cfg)} | {block_unit_name(i): unit_keys(cfg, i) for i in range(cfg.num_layers)}
    assert set(table) == set(groups)
    for name, keys in groups.items():
        got = {k: (shape, quant) for k, shape, quant in table[name]}
        want = {k: (shapes[k], name != "resident" and k in linears) for k in keys}
        assert got == want, name


def test_min_ram_counts_the_all_resident_layout():
    """When VRAM holds everything, the RAM the no-fit message asks for is the baseline alone (it once
    reported a disk-streaming layout's two staging buffers on top)."""
    from liveavatar_lite.runtime.plan import min_ram_bytes

    inp = _toy(4, [500_000_000], 16, 8)
    budget = Budget(vram_bytes=1e12, ram_bytes=0.5e9, cuda_context_bytes=0, vae_arena_bytes=0, host_baseline_bytes=1e9)
    assert min_ram_bytes(inp, budget) == 1e9
    with pytest.raises(BudgetError, match="raise --ram to at least 1.0$"):
        make_plan(inp, budget, RTX4090)
    assert make_plan(inp, replace(budget, ram_bytes=1e9), RTX4090).host_ram_bytes == 1e9


def test_decoder_memory_is_counted_from_its_graph():
    """The ONNX decoder's weights, the working set of the chosen call size and both cache banks are in
    the peak (the arena used to be a guess, 64*W*H*96, too small for the 7-latent warm-up it ran)."""
    plan = make_plan(_inp14("int8"), Budget(vram_bytes=24 * GB, kv_dtype="fp8", decode_latents=None), RTX4090)
    assert plan.decode_latents_per_call == 3  # free choice: the largest call that costs the DiT no speed
    mem = DECODER14.memory((704, 384))
    working = dict(mem.working_set_bytes)
    b = plan.breakdown
    assert plan.decode_latents_per_call in working
    assert b["vae_working_set"] == working[plan.decode_latents_per_call]
    assert b["vae_weights"] == DECODER14.weights_bytes and b["vae_caches"] == mem.caches_bytes
    assert plan.decoder_arena_bytes == b["vae_weights"] + b["vae_working_set"] + b["vae_workspace"]
    assert working[3] > working[1] > 0.5 * GB  # a 3-latent call holds about 3x one latent's feature maps
    assert abs(mem.caches_bytes / GB - 2.56) < 0.01
    # the leanest layout decodes one latent per call
    from liveavatar_lite.runtime.plan import min_vram_bytes as lean

    free = Budget(1, kv_dtype="fp8", decode_latents=None)
    tight = make_plan(_inp14("int8"), replace(free, vram_bytes=lean(_inp14("int8"), free) * 1.0001), RTX4090)
    assert tight.decode_latents_per_call == 1
    # the default: one latent per call whatever the budget (a render's frames never depend on --vram)
    assert make_plan(_inp14("int8"), Budget(vram_bytes=80 * GB, kv_dtype="fp8"), RTX4090).decode_latents_per_call == 1


def test_kv_layer_bytes_are_the_runtime_packing():
    """The plan's KV bytes are the runtime's, to the byte (64-byte aligned parts), for odd token counts."""
    import torch

    from liveavatar_lite.runtime.kv_offload import LayerStore

    for tokens, dtype in ((13, "fp8"), (13, "bf16"), (7, "int8"), (48, "fp8")):
        store = LayerStore(2, tokens, 2, 128, dtype, on_device=True, device=torch.device("cpu"))
        assert KVSpec("x", 0, 2, tokens, 2, 128).nbytes(dtype) == store.nbytes


def test_weights_and_kv_copies_do_not_queue_behind_each_other():
    """Per layer the KV copy needs 6.3 ms of a 10 ms window and a streamed unit 4.2 ms: on one FIFO copy
    stream the unit (issued first) would push the KV past the window at every streamed layer. With
    separate streams the KV waits for one 16 MiB piece at most and the unit uses what is left of several
    windows: no stall is predicted. A KV copy that alone exceeds the window still stalls."""
    from liveavatar_lite.runtime.plan import _Layout, _predict
    from liveavatar_lite.runtime.plan_inputs import WEIGHT_CHUNK_BYTES

    n, unit = 8, 100_000_000
    units = (UnitSize("resident", 1000, None),) + tuple(UnitSize(f"block_{i:03d}", unit, i) for i in range(n))
    ring_tokens = 7324  # x 40 heads x 128 x 2 (k, v) x 2 bytes: 150 MB per layer
    kv = tuple(KVSpec(f"ring.{s}", s, n, ring_tokens, 40, 128) for s in range(4)) + (KVSpec("sink", None, n, 16, 40, 128),)
    attn = RTX4090.attention_tflops() * 1e12 * 0.010  # 10 ms of compute per layer
    wl = Workload(size=(64, 64), block_tokens=48, linear_flops=(0.0,) * n, attn_flops=(attn,) * n,
                  activation_bytes=0, new_kv_layer_bytes_bf16=0)
    inp = PlanInput("int8", units, kv, wl)
    lay = _Layout(frozenset({0, 2, 4, 6}), frozenset(), False, False)
    kv_s = kv[0].layer_bytes("bf16") / (RTX4090.h2d_gbps * 1e9)
    assert kv_s + unit / (RTX4090.h2d_gbps * 1e9) > 0.010 > kv_s + WEIGHT_CHUNK_BYTES / (RTX4090.h2d_gbps * 1e9)
    _, _, parts = _predict(inp, Budget(vram_bytes=1e12), RTX4090, lay)
    assert parts["kv_copy_stall"] == 0 and parts["weight_copy_stall"] == 0
    slow = replace(inp, workload=replace(wl, attn_flops=(attn * kv_s / 0.010 * 0.9,) * n))  # window < the KV copy
    assert _predict(slow, Budget(vram_bytes=1e12), RTX4090, lay)[2]["kv_copy_stall"] > 0


# ------------------------------------------------------------------ the fused path (issue 21)

def _costs(inp, prof, fused: bool, kv: str = "fp8", attention: str = "auto"):
    from liveavatar_lite.runtime.costs import layer_step_costs, resolve_kernels

    return layer_step_costs(inp, prof, resolve_kernels("on" if fused else "off", attention, prof), kv)


def test_fused_costs_are_lower_than_eager_by_the_modelled_traffic():
    """Per layer, fused - eager is exactly the traced minus the fused kernels' bytes at the memory
    rate; GEMMs (the text K/V kept per prompt in both modes) and attention unchanged."""
    from liveavatar_lite.runtime.traffic import fused_elementwise_bytes, unit_elementwise_bytes

    inp = _inp14("int8")
    eager, fused = _costs(inp, RTX4090, False), _costs(inp, RTX4090, True)
    traced = unit_elementwise_bytes(CFG14, (704, 384), "int8", "fp8", inp.sample)
    table = fused_elementwise_bytes(CFG14, (704, 384), "int8", "fp8", inp.sample, "w8a8")
    mem = RTX4090.memory_gbps() * 1e9
    for i, (e, f) in enumerate(zip(eager, fused)):
        k = 1 if i in CFG14.audio_inject_layers else 0
        assert e.elementwise - f.elementwise == pytest.approx((traced[k] - table[k]) / mem, rel=1e-9)
        assert e.gemm == f.gemm and e.attention == f.attention
    # SPEED.md: 12.6 GB (bf16 KV) / 15.1 GB (fp8 KV) per plain layer eager; ~1.9 GB if fully fused
    assert 14.5e9 < traced[0] < 15.5e9 and 1.3e9 < table[0] < 1.9e9


def test_fused_kernel_table_follows_the_formats():
    """The fused kernels' bytes: an 8-bit ring is read at 1 byte + scales where the concatenation
    gathers it (never a separate pass); W8A8 quantizes in the kernel before each GEMM; a W8A16
    card (Hopper) pays one pass per weight (read int8, write bf16) and bf16 GEMM inputs."""
    from liveavatar_lite.runtime.traffic import fused_unit_traffic

    d, f, t, keys = CFG14.dim, CFG14.ffn_dim, 3168, 15312
    fp8 = fused_unit_traffic(CFG14, (704, 384), "int8", "fp8")
    bf16 = fused_unit_traffic(CFG14, (704, 384), "int8", "bf16")
    assert fp8["kv_gather"] == keys * (2 * d + 2 * 4 * CFG14.num_heads) + 2 * 2 * keys * d
    assert bf16["kv_gather"] == keys * 2 * d * 2 + 2 * 2 * keys * d
    assert fp8["norm1_mod_quant"] == 4 * t * d + t * d + 4 * t  # fp32 x in, int8 + per-token scale out
    assert "weight_dequant" not in fp8
    w8a16 = fused_unit_traffic(CFG14, (704, 384), "int8", "fp8", int8_kernel="w8a16")
    assert w8a16["weight_dequant"] == (6 * d * d + 2 * d * f) * 3
    assert w8a16["norm1_mod_quant"] == 4 * t * d + 2 * t * d
    inj = fused_unit_traffic(CFG14, (704, 384), "int8", "fp8", inject=True)
    assert set(inj) - set(fp8) == {"inject_adanorm_quant", "inject_q_norm", "inject_out_quant", "inject_residual"}


def test_each_term_is_computed_from_the_profile_figures():
    """Every fused term is the work over one profile figure: int8 GEMMs at 660 x 0.65, attention at
    FlashAttention-2's 160 TFLOP/s (not 55 % of 165), SageAttention at 320, bytes at 1008 x 0.8 GB/s;
    halving a figure doubles its term and nothing else."""
    from liveavatar_lite.runtime.costs import text_kv_flops
    from liveavatar_lite.runtime.traffic import fused_elementwise_bytes

    inp = _inp14("int8")
    wl = inp.workload
    c = _costs(inp, RTX4090, True)[1]  # layer 1: no audio injector
    assert RTX4090.attention_tflops("auto") == 160.0 and RTX4090.attention_tflops("sage") == 320.0
    assert c.gemm == pytest.approx((wl.linear_flops[1] - text_kv_flops(inp)) / (660e12 * 0.65), rel=1e-12)
    assert c.attention == pytest.approx(wl.attn_flops[1] / 160e12, rel=1e-12)
    plain = fused_elementwise_bytes(CFG14, (704, 384), "int8", "fp8", inp.sample, "w8a8")[0]
    assert c.elementwise == pytest.approx(plain / (1008e9 * 0.8), rel=1e-12)
    assert _costs(inp, RTX4090, True, attention="sage")[1].attention == pytest.approx(c.attention / 2, rel=1e-12)
    slow = replace(RTX4090, mem_gbps=504.0, int8_tops=330.0)
    s = _costs(inp, slow, True)[1]
    assert s.elementwise == pytest.approx(2 * c.elementwise) and s.gemm == pytest.approx(2 * c.gemm)
    assert s.attention == c.attention
    with pytest.raises(UserError, match="no rate for --attention sage"):
        get_profile("h100").attention_tflops("sage")


def test_decoder_on_the_same_gpu_hides_only_in_copy_stalls():
    """Overlapped, block b's decode runs during block b+1's DiT; on one GPU their kernels add up,
    so only the DiT's idle time (copy stalls) hides decoder time; the last block's decode of a
    clip is exposed. Serial: everything adds."""
    from liveavatar_lite.runtime.costs import clip_with_decode

    assert clip_with_decode(2.0, 2.0, 1.0, 4, overlap=False) == (12.0, 4.0)
    assert clip_with_decode(2.0, 2.0, 1.0, 4, overlap=True) == (12.0, 4.0)  # compute-bound: nothing hides
    clip, exposed = clip_with_decode(2.0, 1.5, 1.0, 4, overlap=True)  # 0.5 s of stalls per block
    assert clip == 2.0 + 3 * 2.5 + 1.0 and exposed == pytest.approx(2.5)
    assert clip_with_decode(2.0, 0.5, 1.0, 4, overlap=True) == (9.0, 1.0)  # copy-bound: all but the last hide


def test_rtx4090_fused_prediction_and_its_floors():
    """`plan 14b --format int8 --kv fp8 --vram 24 --device-profile rtx4090` with the fused costs
    (BENCHMARKS.md, issue 21): the PCIe floor of one block-step's copies is ~0.385 s (9.2 GB at
    24 GB/s, SPEED.md); the DiT alone reaches 0.23x real time at 704*384 with FlashAttention-2 and
    0.90x at 384*256, short of the goals (0.25x, 1.0x): attention at 160 TFLOP/s and int8 GEMMs at
    65 % of 660 already take 0.44 s of a 704*384 block-step. The VAE decoder on the same GPU
    (1.16 s per block, extrapolated from the H100's measured 14 % of peak) adds the most."""
    budget = Budget(vram_bytes=24 * GB, ram_bytes=64 * GB, kv_dtype="fp8", compile="auto")
    big = make_plan(_inp14("int8"), budget, RTX4090)
    eager = make_plan(_inp14("int8"), replace(budget, compile="off"), RTX4090)
    assert big.kernels.startswith("fused") and eager.kernels.startswith("eager")
    steps = 16
    assert big.pcie_floor_seconds_per_clip / steps == pytest.approx(0.385, rel=0.05)
    assert big.predicted_seconds_per_clip >= big.pcie_floor_seconds_per_clip
    rtf = lambda s: 48 / 25 / s  # noqa: E731
    assert rtf(eager.predicted_seconds_per_clip) == pytest.approx(0.097, abs=0.003)  # 0.084 before FA2's rate
    assert rtf(big.predicted_seconds_per_clip) == pytest.approx(0.229, abs=0.003)
    assert big.decode_seconds_per_clip / 4 == pytest.approx(1.16, rel=0.02)
    assert rtf(big.clip_seconds) == pytest.approx(0.147, abs=0.003)
    small = make_plan(_inp14("int8", (384, 256)), budget, RTX4090)
    assert rtf(small.predicted_seconds_per_clip) == pytest.approx(0.90, abs=0.02)
    sage = make_plan(_inp14("int8", (384, 256)), replace(budget, attention="sage"), RTX4090)
    assert rtf(sage.predicted_seconds_per_clip) == pytest.approx(1.04, abs=0.02)
    assert rtf(sage.clip_seconds) < 1.0  # the decoder keeps it under real time


def test_eager_costs_still_match_the_h100_measurements():
    """The h100 profile's eager prediction against the DiT seconds per clip measured on an H100
    capped to 24 GB (BENCHMARKS.md, 2026-11-26): 7.95 s (bf16 KV), 8.61 s (fp8 KV), within 5 %;
    its fused prediction is what the next GPU campaign checks (within 10 %)."""
    h100 = get_profile("h100")
    for kv, measured in (("bf16", 7.95), ("fp8", 8.61)):
        plan = make_plan(_inp14("int8"), Budget(vram_bytes=24 * GB, ram_bytes=128 * GB, kv_dtype=kv), h100)
        assert plan.predicted_seconds_per_clip == pytest.approx(measured, rel=0.05)
    fused = make_plan(_inp14("int8"), Budget(vram_bytes=24 * GB, ram_bytes=128 * GB, kv_dtype="fp8", compile="on"), h100)
    assert fused.predicted_seconds_per_clip / 16 == pytest.approx(0.21, abs=0.01)  # goal: <= 0.25 s per block-step
    assert fused.breakdown["text_kv"] == 40 * 2 * 512 * 5120 * 2


def test_generate_plans_under_the_runs_kernels() -> None:
    """`generate`'s plan (pipeline/memory.plan_render) prices the run's compile mode, attention and
    decoder overlap, as `plan --compile/--attention` does; compile_units counts only on CUDA."""
    from pathlib import Path
    from types import SimpleNamespace

    from liveavatar_lite.pipeline.memory import RenderBudget, plan_compile_mode, plan_render
    from liveavatar_lite.runtime.plan_inputs import synthesize_unit_sizes

    # what DiTRuntime runs: auto = compiled on CUDA only; on / off (or True / False) as given
    assert [plan_compile_mode(m, d) for m, d in (("auto", "cuda"), ("auto", "cpu"), ("off", "cuda"), ("on", "cpu"),
                                                 (True, "cuda"), (False, "cuda"))] == ["on", "off", "off", "on", "on", "off"]
    cfg = PRESETS["14b"].dit
    units = tuple(SimpleNamespace(name=u.name, data_nbytes=u.nbytes, kind="dit_resident" if u.layer is None
                                  else "dit_block") for u in synthesize_unit_sizes(cfg, "int8"))
    manifest = SimpleNamespace(dit=cfg, quant=SimpleNamespace(format="int8"), units=units, paths={})
    inp = plan_input(cfg, (704, 384), "int8")
    for kw in ({}, {"compile": "on", "attention": "sage", "overlap_decode": False}):
        rb = RenderBudget(vram_gb=24, ram_gb=128, kv_dtype="fp8", device_profile="rtx4090", **kw)
        got = plan_render(Path("."), manifest, (704, 384), rb, "cuda", quiet=True)
        want = make_plan(inp, Budget(vram_bytes=24e9, ram_bytes=128e9, kv_dtype="fp8", **kw), RTX4090)
        assert got.plan.kernels == want.kernels and got.budget.overlap_decode == kw.get("overlap_decode", True)
        assert got.plan.predicted_seconds_per_clip == pytest.approx(want.predicted_seconds_per_clip)
    assert "eager" in make_plan(inp, Budget(vram_bytes=24e9, kv_dtype="fp8"), RTX4090).kernels
    assert got.plan.kernels == "fused graphs (compile on), attention sage"
