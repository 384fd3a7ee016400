"""The memory plan of one render: the artifact's DiT units and its VAE decoder on one budget.

`runtime/` plans and `decode/` sizes the decoder from its ONNX graph; they may not import each
other, so this module joins them for `generate` (and `plan ARTIFACT`): the decoder's graph goes
into the plan input, the device profile follows one rule (`device_profiles.resolve_profile`), and
the budget is the one `plan` would use. On a machine without a GPU, `--vram GB` plans exactly as
`plan --vram GB` does for a GPU of that size, and the CPU then runs that layout (units through the
two slots, KV rings on the "host"); without `--vram` the CPU has no device budget (all resident).

    planned = plan_render(Path("art"), manifest, (704, 384), RenderBudget(vram_gb=24, kv_dtype="fp8"), "cuda")
    planned.plan.decode_latents_per_call, planned.plan.decoder_arena_bytes
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CPU_UNLIMITED_VRAM = 1e15  # CPU without --vram: "device" memory is host memory, no separate budget


@dataclass(frozen=True)
class RenderBudget:
    """The flags that decide a render's layout."""

    vram_gb: float | None = None  # None: the GPU's free memory (CPU: unlimited)
    ram_gb: float | None = None  # None: this machine's physical RAM
    kv_dtype: str = "bf16"
    device_profile: str | None = None  # None: the GPU's named profile if known, else a probe
    # How the DiT runs, so that the plan prices the run's kernels (Budget.compile / attention /
    # overlap_decode): from the options with `plan_compile_mode`
    compile: str = "off"
    attention: str = "auto"
    overlap_decode: bool = True


def plan_compile_mode(compile_units: str | bool, device: str) -> str:
    """The plan's compile mode ("on" / "off", `Budget.compile`) for the runtime's option (auto | on |
    off, or a bool): what `DiTRuntime` will run on `device` (`fused_units.compile_wanted`)."""
    import torch

    from ..runtime.fused_units import compile_wanted

    return "on" if compile_wanted(compile_units, torch.device(device)) else "off"


@dataclass(frozen=True)
class PlannedRender:
    """A plan with what made it (kept for the out-of-memory advice, which re-plans smaller)."""

    plan: Any
    inputs: Any  # runtime.plan_inputs.PlanInput
    budget: Any  # runtime.plan_inputs.Budget
    profile: Any  # runtime.device_profiles.DeviceProfile
    note: str = ""


def decoder_graph(directory: Path, manifest: Any) -> Any | None:
    """The artifact's ONNX decoder graph (shapes only), or None when it has no decoder."""
    from ..decode.decoder_memory import DecoderGraph

    rel = manifest.paths.get("vae_onnx")
    return DecoderGraph.from_onnx(directory / rel) if rel else None


def plan_render(directory: Path, manifest: Any, size: tuple[int, int], budget: RenderBudget, device: str,
                profile: Any = None, loaded_device_bytes: float = 0.0, quiet: bool = False) -> PlannedRender:
    """The plan `generate` runs under; BudgetError (one line naming what would fit) if nothing fits.

    profile: an already resolved profile (a loaded pipeline resolves it once); loaded_device_bytes:
    device memory this process already holds for the render (counted as free when the budget is the
    GPU's free memory); quiet: no log line (a warm pipeline re-planning the same size)."""
    import torch

    from ..runtime.device_profiles import resolve_profile
    from ..runtime.plan import Budget, make_plan
    from ..runtime.plan_inputs import manifest_unit_sizes, plan_input

    inp = plan_input(manifest.dit, size, manifest.quant.format, unit_sizes=manifest_unit_sizes(manifest),
                     decoder=decoder_graph(directory, manifest))
    if budget.vram_gb is not None:
        vram = budget.vram_gb * 1e9
    elif device == "cuda":
        vram = float(torch.cuda.mem_get_info()[0]) + loaded_device_bytes
    else:
        vram = CPU_UNLIMITED_VRAM
    ram = host_budget_bytes(budget.ram_gb, quiet)
    b = Budget(vram_bytes=vram, ram_bytes=ram, kv_dtype=budget.kv_dtype, compile=budget.compile,
               attention=budget.attention, overlap_decode=budget.overlap_decode)
    note = ""
    if profile is None:
        profile, note = resolve_profile(budget.device_profile, device)
        if note:
            log.info("%s", note)
    plan = make_plan(inp, b, profile)
    if not quiet:
        log.info("plan: peak VRAM %.2f GB, %d streamed units, KV on the host: %s, decoder %d latent(s) per call, "
                 "predicted %.1f s per clip (profile %s; %s)", plan.peak_vram_bytes / 1e9, len(plan.streamed_units),
                 ", ".join(k.name for k in plan.kv if k.placement == "host") or "none", plan.decode_latents_per_call,
                 plan.clip_seconds, profile.name, plan.kernels)
    return PlannedRender(plan, inp, b, profile, note)


OS_RESERVE_BYTES = 4e9  # at least this much RAM stays with the OS: pinned memory cannot be swapped
OS_RESERVE_FRAC = 0.15  # ... or this share of it, whichever is more


def host_budget_bytes(ram_gb: float | None, quiet: bool = False) -> float | None:
    """The host RAM a plan may pin: `ram_gb`, or without it the physical RAM less max(4 GB, 15 %).

    Logs what that leaves for the OS, and warns when it is under 4 GB (pinned pages cannot be
    swapped out: the OS, the page cache and everything else run in what is left).
    """
    physical = physical_ram_bytes()
    if ram_gb is not None:
        ram = ram_gb * 1e9
    elif physical is None:
        return None
    else:
        ram = max(0.0, physical - max(OS_RESERVE_BYTES, OS_RESERVE_FRAC * physical))
    if physical is not None and not quiet:
        left = physical - ram
        if left < OS_RESERVE_BYTES:
            log.warning("--ram %.1f GB leaves %.1f GB of this machine's %.1f GB for the OS (pinned memory cannot "
                        "be swapped); keep at least %.0f GB free", ram / 1e9, max(0.0, left) / 1e9, physical / 1e9,
                        OS_RESERVE_BYTES / 1e9)
        else:
            log.info("host budget %.1f GB of %.1f GB RAM; %.1f GB left for the OS%s", ram / 1e9, physical / 1e9,
                     left / 1e9, "" if ram_gb is not None else " (--ram sets it)")
    return ram


def physical_ram_bytes() -> float | None:
    """Total physical memory (POSIX), the default host budget; None where the OS does not say."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
