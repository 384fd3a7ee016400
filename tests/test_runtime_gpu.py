"""GPU checks of the runtime (skipped without CUDA; written to run on a 24 GB card or larger).

* streamed == resident bit for bit on CUDA (catches a missing event wait: a slot read before its
  copy landed, or overwritten while in use, changes the output);
* under `set_per_process_memory_fraction` for a 24 GB card, `max_memory_reserved` stays within
  the plan's predicted peak (the part torch allocates) + 5 %;
* 14B-shaped random INT8 blocks at 704*384: interleaved half-streamed step time <= 1.10x resident;
* the full 40-layer int8 / fp8-KV layout the plan picks for --vram 24, next to the real-size ONNX
  decoder: device-wide memory (NVML: ORT and the CUDA context included) within the budget, pinned
  host bytes equal to the plan's.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_runtime import artifacts  # noqa: F401  (the tiny int8/int4 artifacts fixture)

from liveavatar_lite.config import PRESETS
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.plan import GB, Budget, make_plan, min_vram_bytes
from liveavatar_lite.runtime.plan_inputs import plan_input

pytestmark = pytest.mark.gpu
SIZE = (704, 384)
LAYERS = 8  # 14B-shaped blocks, fewer of them: the ratios and the per-unit peak do not depend on the count


def _cfg14(layers: int = LAYERS):
    cfg = PRESETS["14b"].dit
    return replace(cfg, num_layers=layers, audio_inject_layers=tuple(i for i in cfg.audio_inject_layers if i < layers))


def test_cuda_streamed_equals_resident_tiny(artifacts):
    from test_runtime import _inputs, _plans, _run

    from liveavatar_lite.runtime.dit_runtime import DiTRuntime

    plans = _plans(artifacts["int8"], "bf16")
    inp = _inputs()
    want = _run(DiTRuntime.from_artifact(artifacts["int8"], plans[0], device="cuda"), inp, blocks=5)
    for plan in plans[1:]:
        got = _run(DiTRuntime.from_artifact(artifacts["int8"], plan, device="cuda"), inp, blocks=5)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def units14():
    from bench_stream import synthetic_units

    return synthetic_units(_cfg14(), "int8", pin=True)


def test_memory_within_predicted_peak(units14):
    from bench_stream import run_steps

    from liveavatar_lite.runtime.dit_runtime import DiTRuntime

    cfg = _cfg14()
    inp = plan_input(cfg, SIZE, "int8", unit_sizes={u.name: u.nbytes for u in units14})
    budget = Budget(vram_bytes=24 * GB, kv_dtype="fp8")
    # 8 blocks fit a 24 GB card whole; shrink the budget so that about half of them stream
    lean = min_vram_bytes(inp, budget)
    block = max(u.nbytes for u in units14 if u.layer is not None)
    budget = replace(budget, vram_bytes=lean + LAYERS // 2 * block / 0.93)
    plan = make_plan(inp, budget, get_profile("rtx4090"))
    assert plan.streamed_units
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * GB / total))
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rt = DiTRuntime(cfg, units14, plan, device="cuda")
        run_steps(rt, cfg, SIZE, blocks=1, device="cuda")
        # what torch allocates here: the plan's peak without the CUDA context and the VAE decoder (not built)
        b = plan.breakdown
        torch_part = plan.peak_vram_bytes - b["cuda_context"] - plan.decoder_arena_bytes - b["vae_caches"]
        assert torch.cuda.max_memory_reserved() <= torch_part * 1.05, (torch.cuda.max_memory_reserved() / GB, torch_part / GB)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_streamed_step_time_within_10_percent(units14):
    from bench_stream import run_steps

    from liveavatar_lite.runtime.dit_runtime import DiTRuntime

    cfg = _cfg14()
    inp = plan_input(cfg, SIZE, "int8", unit_sizes={u.name: u.nbytes for u in units14})
    resident = make_plan(inp, Budget(vram_bytes=1e15, kv_dtype="fp8"), get_profile("rtx4090"))
    # every other block streamed (interleaved), KV placement unchanged: isolates weight streaming
    half = replace(resident, units=tuple(replace(u, placement="host") if u.layer is not None and u.layer % 2 else u
                                         for u in resident.units))
    times = {}
    for label, plan in (("resident", resident), ("streamed", half)):
        rt = DiTRuntime(cfg, units14, plan, device="cuda")
        steps = run_steps(rt, cfg, SIZE, blocks=2, device="cuda")
        times[label] = sum(steps[4:]) / len(steps[4:])
        del rt
        torch.cuda.empty_cache()
    assert times["streamed"] <= 1.10 * times["resident"], times


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")
def test_full_14b_plan_at_24gb_device_wide(tmp_path):
    """The 40-layer int8 DiT with fp8 KV placed by the plan for --vram 24, beside the real-size fp16
    ONNX decoder built with the plan's arena cap and call size: torch capped at the budget, device
    memory sampled for the whole process (NVML, else mem_get_info) after one block and its decode.
    Prints the figures BENCHMARKS.md asks for (context cost, pinned bytes, peak)."""
    from bench_stream import run_steps, synthetic_units
    from vae_fixtures import random_latents, random_vae

    from liveavatar_lite.decode.decoder_memory import DecoderGraph
    from liveavatar_lite.decode.vae_export import export_decoder
    from liveavatar_lite.decode.vae_onnx import OnnxVAEDecoder
    from liveavatar_lite.pipeline.ledger import device_memory
    from liveavatar_lite.runtime.dit_runtime import DiTRuntime
    from liveavatar_lite.runtime.pinned import pinned_bytes

    def used() -> int:
        torch.cuda.synchronize()
        d = device_memory(torch.device("cuda"))
        return d["process_bytes"] or d["device_used_bytes"]

    cfg = PRESETS["14b"].dit
    torch.cuda.init()
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # cuBLAS handle + workspace
    context = used()
    onnx_path = export_decoder(random_vae(PRESETS["14b"].vae, seed=0), tmp_path / "dec.onnx", dtype="fp16")
    units = synthetic_units(cfg, "int8", pin=False)
    inp = plan_input(cfg, SIZE, "int8", unit_sizes={u.name: u.nbytes for u in units},
                     decoder=DecoderGraph.from_onnx(onnx_path))
    plan = make_plan(inp, Budget(vram_bytes=24 * GB, kv_dtype="fp8"), get_profile("rtx4090"))
    units = synthetic_units(cfg, "int8", pin=True)  # the same bytes, page-locked at their exact size
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * GB / total))
    try:
        pinned0 = pinned_bytes()
        rt = DiTRuntime(cfg, units, plan, device="cuda", timing=True)
        pinned = pinned_bytes() - pinned0
        decoder = OnnxVAEDecoder(onnx_path, device="cuda", gpu_mem_limit=plan.decoder_arena_bytes,
                                 latents_per_call=plan.decode_latents_per_call)
        after_session = used()
        run_steps(rt, cfg, SIZE, blocks=1, device="cuda")
        decoder.decode(random_latents((1, 16, 3, SIZE[1] // 8, SIZE[0] // 8), seed=1)[0].numpy())
        peak = used()
        waits = rt.copy_counters()
        print(f"\n40-layer int8 / fp8 KV at --vram 24: context+cuBLAS {context / GB:.2f} GB (plan 0.80), "
              f"after the ORT session {after_session / GB:.2f} GB, process after a block + decode {peak / GB:.2f} GB "
              f"(plan peak {plan.peak_vram_bytes / GB:.2f} GB), torch max reserved "
              f"{torch.cuda.max_memory_reserved() / GB:.2f} GB; pinned KV {pinned / GB:.2f} GB (plan "
              f"{plan.host_breakdown['pinned_kv'] / GB:.2f} GB); copy wait weights {waits['copy_wait_weights_s']:.3f} s, "
              f"KV {waits['copy_wait_kv_s']:.3f} s")
        # the synthetic units were pinned before (all of them); the runtime adds the host KV at its exact size
        assert pinned == plan.host_breakdown["pinned_kv"] + plan.host_breakdown.get("staging", 0)
        assert peak <= plan.vram_budget_bytes
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
