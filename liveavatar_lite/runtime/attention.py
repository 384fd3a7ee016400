"""The attention kernel, chosen on purpose per device and recorded (`--attention`).

`resolve_attention` turns a request into an `AttentionKernel` once, at load time; `use_attention`
hands it to every attention module of a DiT (their `attn_kernel` attribute, which the model's
`attend()` calls: the choice is passed in, nothing global is switched). The kernel takes and
returns [B, heads, L, head_dim] (SDPA's layout), no mask, softmax scale 1/sqrt(head_dim).

| request   | what runs                                                                           |
|-----------|-------------------------------------------------------------------------------------|
| auto      | the first that runs here: sm_90 cuDNN, flash, efficient, math; sm_8x and sm_100+    |
|           | flash, efficient, math; sm_7x efficient, math; CPU flash (torch's CPU kernel), math;|
|           | the later ones stay allowed, in that order, for a shape the first refuses           |
| sdpa      | whatever torch picks per call (unpinned); the record names its pick at load time    |
| flash, cudnn, efficient, math | that SDPA backend only (`torch.nn.attention.sdpa_kernel`)       |
| sage      | SageAttention 1 (int8 Q.K^T, fp16 P.V; Triton, CUDA): `pip install liveavatar-lite[attention]` |

A pinned backend is probed once with the DiT's head dim and dtype; one that cannot run here is a
one-line `UserError` before any weights load. `check_attention` makes the checks that touch no
device (choice, device type, sage's package and head dims): what a validating parent process runs. On CPU, "auto" keeps the backend torch itself picks
(its flash kernel), so CPU renders keep their numerics; "math" is selectable.

    kernel = resolve_attention("auto", torch.device("cuda"), torch.bfloat16, head_dim=128)
    use_attention(dit, kernel); kernel.record()  # {'attention': 'cudnn', 'attention_requested': 'auto'}
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UserError, first_line
from .device_profiles import ATTENTION_CHOICES

CHOICES = ATTENTION_CHOICES  # what `--attention` offers (device_profiles prices each)
SAGE_HEAD_DIMS = (64, 96, 128)  # what sageattention 1.0.x's kernels support
_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_NAMES = {b: n for n, b in _BACKENDS.items()}
SAGE_INSTALL = "pip install 'liveavatar-lite[attention]'"


@dataclass(frozen=True)
class AttentionKernel:
    """q, k, v [B, n, L, d] -> [B, n, Lq, d]. `name` is what runs; `pinned` False: torch picks per call."""

    name: str  # flash | cudnn | efficient | math | sage
    requested: str  # the request it was resolved from (auto, sdpa, ...)
    pinned: bool = True
    fallbacks: tuple[str, ...] = ()  # "auto": backends torch may use, in order, for a shape `name` refuses

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.name == "sage":
            return _sage(q, k, v)
        if not self.pinned:
            return F.scaled_dot_product_attention(q, k, v)
        if self.fallbacks:  # `name` first; the others only for a shape it refuses (auto)
            with sdpa_kernel([_BACKENDS[b] for b in (self.name, *self.fallbacks)], set_priority=True):
                return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(_BACKENDS[self.name]):  # this backend only: torch raises rather than switch
            return F.scaled_dot_product_attention(q, k, v)

    def record(self) -> dict[str, Any]:
        """The telemetry / benchmark fields: which kernel runs and what was asked for."""
        return {"attention": self.name if self.pinned else f"sdpa:{self.name}", "attention_requested": self.requested}


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from sageattention import sageattn  # lazily: an optional extra (CUDA + Triton)

    # SageAttention smooths K by subtracting its mean over the keys *in place*; do it out of place
    # (the cached text K/V must not change). Softmax is unchanged: q.(k - m) shifts every logit
    # of a query by the same q.m.
    k = k - k.mean(dim=2, keepdim=True)
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, smooth_k=False)


def auto_order(device: torch.device, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The SDPA backends "auto" tries, best first, on `device` (CUDA: its compute `capability`,
    read from the device when not given, so the order is testable without a GPU)."""
    if device.type != "cuda":
        return ("flash", "math")  # torch's own CPU pick first (its flash kernel): CPU numerics unchanged
    major = (capability or torch.cuda.get_device_capability(device))[0]
    if major == 9:  # Hopper: cuDNN's SDPA (FA3-class) beats FA2
        return ("cudnn", "flash", "efficient", "math")
    if major == 8 or major >= 10:  # Ampere / Ada: FA2; Blackwell and newer (sm_100, sm_120): flash as torch
        return ("flash", "efficient", "math")
    return ("efficient", "math")  # Volta / Turing: no flash kernel


def _probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when backend `name` runs one small call here, else why not (one line)."""
    q = torch.zeros(1, 2, 16, head_dim, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as seen:  # SDPA says why a backend refused as warnings
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(_BACKENDS[name]):
                F.scaled_dot_product_attention(q, q, q)
        except RuntimeError as e:
            reasons = [first_line(w.message) for w in seen
                       if "because" in str(w.message) or "requires" in str(w.message)]
            return reasons[0] if reasons else first_line(e)
    return None


def _torch_pick(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    q = torch.zeros(1, 2, 16, head_dim, device=device, dtype=dtype)
    return _NAMES.get(SDPBackend(torch._fused_sdp_choice(q, q, q)), "math")


def check_attention(requested: str, device: torch.device | str, head_dim: int = 128) -> None:
    """The checks of `resolve_attention` that touch no device (the choice, the device type, sage's
    package and head dims): UserError, one line. A process that only validates (serve's and farm's
    parents) calls this; the probes run where the model loads."""
    device = torch.device(device)
    if requested not in CHOICES:
        raise UserError(f"unknown attention {requested!r}; choose one of {', '.join(CHOICES)}")
    if requested == "sage":
        if device.type != "cuda":
            raise UserError("--attention sage needs a CUDA GPU (SageAttention is Triton-only); "
                            f"this run is on {device.type}")
        try:
            import sageattention  # noqa: F401
        except ImportError:
            raise UserError(f"--attention sage needs the sageattention package: {SAGE_INSTALL}") from None
        if head_dim not in SAGE_HEAD_DIMS:
            raise UserError(f"--attention sage supports head dims {SAGE_HEAD_DIMS}; this model's is {head_dim}")
    if device.type != "cuda" and requested in ("cudnn", "efficient"):
        raise UserError(f"--attention {requested} needs a CUDA GPU; this run is on {device.type} "
                        "(choose auto, sdpa, flash or math)")


def resolve_attention(requested: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                      head_dim: int = 128) -> AttentionKernel:
    """The kernel for `requested` on `device` (attention inputs in `dtype`); UserError, one line, if
    it cannot run here. Probes run one tiny attention call per candidate, once per load."""
    device = torch.device(device)
    check_attention(requested, device, head_dim)
    if requested == "sage":
        return AttentionKernel("sage", requested)
    if requested == "sdpa":
        return AttentionKernel(_torch_pick(device, dtype, head_dim), requested, pinned=False)
    if requested == "auto":
        order = auto_order(device)
        for i, name in enumerate(order):
            if _probe(name, device, dtype, head_dim) is None:
                return AttentionKernel(name, requested, fallbacks=order[i + 1:])
        return AttentionKernel(_torch_pick(device, dtype, head_dim), requested, pinned=False)
    why = _probe(requested, device, dtype, head_dim)
    if why is not None:
        raise UserError(f"--attention {requested} cannot run on {device.type} ({str(dtype).removeprefix('torch.')}, "
                        f"head dim {head_dim}): {why}")
    return AttentionKernel(requested, requested)


def use_attention(root: nn.Module, kernel: AttentionKernel) -> int:
    """Give `kernel` to every attention module under `root` (those with an `attn_kernel` attribute,
    model/dit_blocks.py); returns how many. The model declares the attribute; this only sets it."""
    mods = [m for m in root.modules() if hasattr(m, "attn_kernel")]
    for m in mods:
        m.attn_kernel = kernel
    return len(mods)


def attention_record(root: nn.Module) -> dict[str, Any]:
    """What `use_attention` installed under `root` (telemetry, `bench speed`); torch's unpinned
    default when nothing was installed."""
    kernels = {m.attn_kernel for m in root.modules() if hasattr(m, "attn_kernel")}
    if len(kernels) == 1 and None not in kernels:
        return next(iter(kernels)).record()
    if kernels == {None} or not kernels:
        return {"attention": "sdpa", "attention_requested": None}
    return {"attention": "mixed", "attention_requested": None}
