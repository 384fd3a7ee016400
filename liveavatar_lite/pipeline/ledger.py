"""The memory ledger: per clip, each figure of the plan next to what the process really holds.

The plan predicts every byte a render needs (`runtime/plan.py`); this module measures the same
items after each clip, so a wrong prediction shows up in the first clip's telemetry instead of as an
out-of-memory error an hour in. Rows (predicted, measured):

* device parts the runtime allocates itself, by the plan's names: resident weights, the weight
  slots, KV kept on the device, the KV slots, the decoder's cache banks (exact, on CPU too);
* device memory of the whole process, ONNX Runtime and the CUDA context included (NVML's figure
  for this process; else the device's used memory from `mem_get_info`), and torch's peak
  reservation next to the plan's torch part (GPU only; ORT's and torch's pools keep their peak
  reservation, so a sample at the clip's end sees it);
* host: the exact-size host buffers (pinned on a GPU machine: our page-locked bytes plus what
  torch's own pinned allocator holds, `torch.cuda.host_memory_stats`), and peak RSS against the
  plan's host RAM figure;
* time: wall seconds per clip (predicted: the plan's `clip_seconds`, the DiT plus the decoder time
  it does not hide, as the measured seconds include decoding), copy-wait split into weights and KV
  (predicted: the plan's copy stalls), H2D bytes per clip.

    mark = clip_mark(renderer); ...render a clip...; fields = clip_fields(renderer, mark, seconds)
    print(format_ledger(fields["ledger"]))
"""
from __future__ import annotations

import os
from typing import Any

from .telemetry import format_ledger, host_rss_bytes

__all__ = ["clip_fields", "clip_mark", "device_memory", "format_ledger", "memory_ledger"]


def clip_mark(renderer: Any) -> dict[str, float]:
    """The renderer's running copy counters now ({} for a renderer that has none, e.g. a test fake)."""
    counters = getattr(renderer, "counters", None)
    return dict(counters()) if counters is not None else {}


def clip_fields(renderer: Any, mark: dict[str, float], seconds: float) -> dict[str, Any]:
    """Telemetry fields of the clip that began at `mark`: the copy counters' increase (copy-wait split
    into weights and KV, H2D bytes) and, for the artifact renderer, the ledger."""
    if not mark:
        return {}
    now = clip_mark(renderer)
    fields: dict[str, Any] = {k: round(now[k] - mark.get(k, 0.0), 6) for k in now}
    ledger = getattr(renderer, "ledger", None)
    if ledger is not None:
        fields["ledger"] = ledger(seconds, fields)
    return fields


def memory_ledger(plan: Any, runtime: Any, decoder: Any | None, seconds: float | None,
                  clip: dict[str, float]) -> dict[str, dict[str, float | int | None]]:
    """{item: {"predicted": x, "measured": y}} for one clip (`clip`: its copy-counter increases)."""
    from ..runtime.pinned import host_buffer_bytes, pinned_bytes

    b, hb = plan.breakdown, plan.host_breakdown
    dev = runtime.device_bytes()
    host = runtime.host_bytes()
    rows: dict[str, tuple[Any, Any]] = {k: (b.get(k, 0), dev.get(k)) for k in
                                        ("resident_weights", "weight_slots", "gpu_kv", "kv_slots")}
    rows["vae_caches"] = (b.get("vae_caches", 0), decoder.bank_bytes() if decoder is not None else None)
    gpu = device_memory(runtime.device)
    if gpu:
        torch_part = plan.peak_vram_bytes - b.get("cuda_context", 0) - plan.decoder_arena_bytes
        rows["device_process_total"] = (plan.peak_vram_bytes, gpu.get("process_bytes") or gpu.get("device_used_bytes"))
        rows["torch_reserved_peak"] = (torch_part, gpu.get("torch_max_reserved_bytes"))
        rows["pinned_host"] = (plan.pinned_host_bytes, pinned_bytes())
    for k in ("pinned_weights", "staging", "pinned_kv"):
        if k in hb:
            rows[f"host_{k}"] = (hb[k], host.get(k, 0))
    rows["host_buffers"] = (plan.pinned_host_bytes, host_buffer_bytes())
    rows["host_rss_peak"] = (plan.host_ram_bytes, host_rss_bytes()[1])
    stalls = plan.seconds_breakdown
    # the measured clip includes decoding: compare with the plan's DiT + exposed decoder seconds
    rows["seconds"] = (round(plan.clip_seconds, 4), seconds)
    rows["copy_wait_weights_s"] = (stalls.get("weight_copy_stall"), clip.get("copy_wait_weights_s"))
    rows["copy_wait_kv_s"] = (stalls.get("kv_copy_stall"), clip.get("copy_wait_kv_s"))
    rows["h2d_bytes"] = (plan.h2d_bytes_per_clip, (clip.get("h2d_weights_bytes") or 0) + (clip.get("h2d_kv_bytes") or 0))
    return {k: {"predicted": p, "measured": m} for k, (p, m) in rows.items()}


def device_memory(device: Any) -> dict[str, int | None]:
    """Measured device memory on a GPU ({} elsewhere): this process's total (NVML, ORT and context
    included; None where NVML cannot see the process), the device's used bytes, torch's peaks."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"process_bytes": _nvml_process_bytes(device), "device_used_bytes": int(total - free),
            "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}


def _nvml_process_bytes(device: Any) -> int | None:
    """Device memory NVML attributes to this process (None without pynvml or when the pid is hidden)."""
    try:
        import pynvml
    except ImportError:
        return None
    import torch

    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory)
    except (pynvml.NVMLError, RuntimeError, AttributeError):  # not fatal: the device-wide figure stands in
        return None
    return None
