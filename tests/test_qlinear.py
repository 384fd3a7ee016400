"""QuantLinear kernels against the pure-torch reference (dequantize + F.linear) and the float weight."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from liveavatar_lite.artifact.qtypes import QuantType, nf4_code
from liveavatar_lite.runtime.qlinear import (
    QuantLinear,
    linear_w8a8,
    linear_w8a8_fused,
    quantize_per_token_int8,
    swap_linears,
    w8a8_expr,
)
from quantize.quantizers import quantize_tensor

N, K, M = 64, 256, 24


def _snr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()))


def _qlinear(qtype: QuantType, w: torch.Tensor, b: torch.Tensor, group: int | None = None,
             kernel: str = "auto") -> QuantLinear:
    m = QuantLinear(K, N, qtype, group, bias=True, bias_dtype=torch.float32, device="cpu", kernel=kernel)
    for role, t in quantize_tensor(qtype, w, group).items():
        getattr(m, f"weight_{role}").copy_(t)
    m.bias.data.copy_(b)
    return m


@pytest.fixture
def wxb():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, K, generator=g) / 16, torch.randn(2, M // 2, K, generator=g), torch.randn(N, generator=g)


@pytest.mark.parametrize("qtype,group,min_db", [
    (QuantType.INT8, None, 36), (QuantType.FP8, None, 28), (QuantType.INT4, 64, 18),
    (QuantType.INT4, 128, 18), (QuantType.NF4, None, 18),
])
def test_reference_kernel_close_to_float(wxb, qtype, group, min_db):
    w, x, b = wxb
    m = _qlinear(qtype, w, b, group)
    y = m(x)
    assert y.shape == (2, M // 2, N)
    want = nn.functional.linear(x, w, b)
    assert _snr_db(want, y) >= min_db
    # the reference path is exactly dequantize + F.linear
    assert torch.equal(y, nn.functional.linear(x, m.dequantized(torch.float32), b))


def test_w8a8_matches_its_definition(wxb):
    w, x, b = wxb
    m = _qlinear(QuantType.INT8, w, b, kernel="w8a8")
    y = m(x)
    x2 = x.reshape(-1, K)
    xq, sx = quantize_per_token_int8(x2)
    acc = xq.int() @ m.weight_data.int().t()  # exact int32 accumulation
    want = (acc.float() * sx * m.weight_scale[None, :] + b).reshape(2, M // 2, N)
    assert torch.equal(y, want)
    assert _snr_db(nn.functional.linear(x, w, b), y) >= 30  # W8A8 costs a few dB over W8A16
    assert torch.equal(linear_w8a8(x2, m.weight_data, m.weight_scale, m.bias), y.reshape(-1, N))


def _w8a8_bound(x2: torch.Tensor, m: QuantLinear, ref: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """How far a differently-compiled W8A8 may land from the eager one, per output [M, N].

    The absmax is exact (a max), the scale one correctly rounded division; a compiler may still
    compute x / s as x * (1/s) or contract the epilogue into FMAs: 1 ulp in x / s flips the
    rounding of an element only at a tie (.5), moving that int8 value by one step, so output
    (m, n) moves by at most flips[m] * sx[m] * max|Wq[n, :]| * sw[n]; the epilogue's three fp32
    operations add at most 4 ulp of the largest term."""
    _, sx = quantize_per_token_int8(x2)
    wmax = m.weight_data.abs().amax(dim=1).float()  # [N], <= 127
    step = flips.float()[:, None] * sx * wmax[None, :] * m.weight_scale.float()[None, :]
    return step + 4 * 2.0**-23 * (ref.abs() + m.bias.abs()[None, :])


def test_w8a8_expr_is_the_eager_math(wxb):
    """The functional expression a compiled graph traces (w8a8_expr) is the same arithmetic as
    the in-place eager kernel, op for op: equal bit for bit when run eagerly."""
    w, x, b = wxb
    m = _qlinear(QuantType.INT8, w, b, kernel="w8a8")
    x2 = x.reshape(-1, K)
    assert torch.equal(w8a8_expr(x2, m.weight_data, m.weight_scale, m.bias),
                       linear_w8a8(x2, m.weight_data, m.weight_scale, m.bias))
    xb = x2.bfloat16()  # bf16 activations: x / s widens to fp32 in both
    assert torch.equal(w8a8_expr(xb, m.weight_data, m.weight_scale, m.bias.bfloat16()),
                       linear_w8a8(xb, m.weight_data, m.weight_scale, m.bias.bfloat16()))


@pytest.mark.parametrize("qtype,kernel", [(QuantType.INT8, "w8a8"), (QuantType.INT8, "w8a8_fused"),
                                          (QuantType.FP8, "scaled_mm"), (QuantType.INT8, "reference")])
def test_quantized_linears_trace_without_graph_breaks(wxb, qtype, kernel):
    """A compiled unit graph (i21graph) must see each kernel whole: dynamo with fullgraph=True
    (backend "eager" runs the traced ops unchanged, so the result is the eager one exactly)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    w, x, b = wxb
    m = _qlinear(qtype, w, b, kernel=kernel)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True, backend="eager")(x[:, :8])  # 16 tokens
        want = _qlinear(qtype, w, b, kernel="w8a8" if kernel == "w8a8_fused" else kernel)(x[:, :8])
    assert dict(counters["graph_break"]) == {}
    assert torch.equal(got, want)


@pytest.mark.slow
def test_w8a8_fused_by_inductor_matches_the_eager_kernel(wxb):
    """The inductor-compiled W8A8 (quantize in one fused loop, `_int_mm`, one epilogue loop) against
    the eager kernel, within `_w8a8_bound`; the rounding flips must be rare (ties only).
    (`bench qlinear` prints the kernels and bytes, fused vs eager, from inductor's counters.)"""
    w, x, b = wxb
    m = _qlinear(QuantType.INT8, w, b, kernel="w8a8_fused")
    x2 = torch.cat([x.reshape(-1, K), torch.randn(40, K, generator=torch.Generator().manual_seed(9)) * 30])
    torch._dynamo.reset()
    with torch.no_grad():
        got = m(x2)
    ref = linear_w8a8(x2, m.weight_data, m.weight_scale, m.bias)
    xq_ref, _ = quantize_per_token_int8(x2)
    sx_c = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 127  # the compiled graph's scale
    xq_c = torch.compile(lambda t: (t / sx_c).round().clamp(-127, 127).to(torch.int8), fullgraph=True)(x2)
    flips = (xq_c.int() - xq_ref.int()).abs()
    assert int(flips.max()) <= 1 and int(flips.sum()) <= x2.numel() // 1000  # ties only
    assert bool(((got - ref).abs() <= _w8a8_bound(x2, m, ref, flips.sum(dim=1))).all())
    assert m.kernel == "w8a8_fused"  # no fallback to dequantize + matmul
    assert torch.equal(linear_w8a8_fused(x2, m.weight_data, m.weight_scale, m.bias), got)  # cached compile


def test_w8a8_per_token_scales_isolate_outlier_tokens(wxb):
    w, x, b = wxb
    x = x.clone()
    x[0, 0] *= 1000  # one loud token must not wreck the others (per-tensor scaling would)
    m = _qlinear(QuantType.INT8, w, b, kernel="w8a8")
    y, want = m(x), nn.functional.linear(x, w, b)
    assert _snr_db(want[0, 1:], y[0, 1:]) >= 30


def test_nf4_bnb_kernel_matches_reference(wxb, caplog):
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    w, x, b = wxb
    ref = _qlinear(QuantType.NF4, w, b, kernel="reference")
    fast = _qlinear(QuantType.NF4, w, b, kernel="bnb")
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    code = nf4_code(x.device)
    fast(x)
    assert nf4_code(x.device) is code  # the lookup table is built once per device, not per call


def test_nf4_code_table_is_built_once_per_device(wxb, monkeypatch):
    """Dequantizing nf4 (the path without bitsandbytes) must not build its 16-entry table per call:
    on CUDA `torch.tensor(..., device=...)` copies from pageable memory, a host sync per linear."""
    w, x, b = wxb
    m = _qlinear(QuantType.NF4, w, b, kernel="reference")
    m(x)  # first use on this device may build it
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    m(x)
    m(x)
    assert made == [] and nf4_code("cpu") is nf4_code(torch.device("cpu"))


def _spy_scaled_mm(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, *r, **k: calls.append(tuple(a.shape)) or real(a, *r, **k))
    return calls


@pytest.mark.parametrize("tokens", [47, 48, 5])
def test_fp8_pads_rows_instead_of_falling_back(tokens, monkeypatch):
    """2967 tokens at 688*368 (or 5 audio tokens) are not a multiple of 16: the rows are padded and
    `_scaled_mm` still runs (it used to fall back to dequantize + bf16 silently). On the CPU too."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(N, K, generator=g) / 16, torch.randn(N, generator=g)
    x = torch.randn(tokens, K, generator=g)
    m = _qlinear(QuantType.FP8, w, b, kernel="scaled_mm")
    calls = _spy_scaled_mm(monkeypatch)
    y = m(x)
    assert calls == [(-(-tokens // 16) * 16, K)] and y.shape == (tokens, N)
    assert m.kernel == "scaled_mm"  # no fallback
    assert _snr_db(nn.functional.linear(x, w, b), y) >= 24
    padded = torch.cat([x, torch.zeros(-tokens % 16, K)])  # the same call by hand
    torch.testing.assert_close(y, m(padded)[:tokens], rtol=0, atol=0)


def test_swap_linears_replaces_in_parent():
    model = nn.Sequential(nn.Linear(K, N), nn.GELU(), nn.Sequential(nn.Linear(N, N, bias=False)))
    swapped = swap_linears(model, {"0": (QuantType.INT8, None), "2.0": (QuantType.INT4, 64),
                                   "1": (QuantType.BF16, None)})
    assert swapped == ["0", "2.0"]
    assert isinstance(model[0], QuantLinear) and model[0].weight_data.device.type == "meta"
    assert isinstance(model[2][0], QuantLinear) and model[2][0].bias is None
    assert model[2][0].weight_zero.shape == (N, N // 64)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        swap_linears(model, {"1": (QuantType.INT8, None)})


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,kernel,min_db", [
    (QuantType.INT8, "w8a8", 30), (QuantType.FP8, "scaled_mm", 24), (QuantType.NF4, "bnb", 18),
])
def test_cuda_kernels(wxb, qtype, kernel, min_db):
    if qtype is QuantType.FP8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("row-wise fp8 _scaled_mm needs sm_89+")
    if kernel == "bnb":
        pytest.importorskip("bitsandbytes", reason="the [bnb] extra is not installed here")
    w, x, b = wxb
    m = _qlinear(qtype, w, b, kernel=kernel).cuda()
    m.bias.data = m.bias.data.bfloat16()
    y = m(x.cuda().bfloat16()).float().cpu()
    assert _snr_db(nn.functional.linear(x, w, b), y) >= min_db


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [47, 2967])
def test_cuda_fp8_really_calls_scaled_mm(tokens, monkeypatch):
    """>= 32 tokens, not a multiple of 16 (2967 = 688*368's block): `_scaled_mm` must run, on padded rows,
    and the layer must not have switched itself to the dequantize fallback."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("row-wise fp8 _scaled_mm needs sm_89+")
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(N, K, generator=g) / 16, torch.randn(N, generator=g)
    x = torch.randn(tokens, K, generator=g)
    m = _qlinear(QuantType.FP8, w, b).cuda()  # kernel "auto": must pick scaled_mm on sm_89+
    m.bias.data = m.bias.data.bfloat16()
    calls = _spy_scaled_mm(monkeypatch)
    y = m(x.cuda().bfloat16()).float().cpu()
    assert calls == [(-(-tokens // 16) * 16, K)] and m.kernel == "auto"
    assert _snr_db(nn.functional.linear(x, w, b), y) >= 24


@pytest.mark.gpu
def test_cuda_int8_auto_kernel_follows_the_architecture(monkeypatch):
    """int8 "auto": `_int_mm` (W8A8) except on Hopper, where it ran at under half bf16's rate (H100,
    2026-11-26) and the weight is dequantized to bf16 instead (W8A16); both stay accurate."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(N, K, generator=g) / 16, torch.randn(N, generator=g)
    x = torch.randn(64, K, generator=g)
    m = _qlinear(QuantType.INT8, w, b).cuda()
    m.bias.data = m.bias.data.bfloat16()
    calls: list[tuple[int, ...]] = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, *r, **k: calls.append(tuple(a.shape)) or real(a, *r, **k))
    y = m(x.cuda().bfloat16()).float().cpu()
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert (calls == []) if hopper else (calls == [(64, K)])
    assert _snr_db(nn.functional.linear(x, w, b), y) >= 30


@pytest.mark.gpu
def test_cuda_w8a8_fused_matches_the_eager_kernel():
    """On CUDA the fused W8A8 (inductor's Triton quantize + `_int_mm` + epilogue) against the eager
    kernel in bf16: the bound of `_w8a8_bound` plus one bf16 rounding of the output (2^-8 relative)."""
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(256, 512, generator=g) / 16, torch.randn(256, generator=g)
    m = QuantLinear(512, 256, QuantType.INT8, None, bias=True, bias_dtype=torch.bfloat16, device="cpu",
                    kernel="w8a8_fused")
    for role, t in quantize_tensor(QuantType.INT8, w, None).items():
        getattr(m, f"weight_{role}").copy_(t)
    m.bias.data.copy_(b)
    m = m.cuda()
    x2 = torch.randn(3168 // 8, 512, generator=g).cuda().bfloat16()
    got = m(x2).float()
    ref = linear_w8a8(x2, m.weight_data, m.weight_scale, m.bias).float()
    bound = _w8a8_bound(x2, m, ref, torch.full((x2.shape[0],), 2, device="cuda")) + 2.0**-8 * ref.abs()
    assert bool(((got - ref).abs() <= bound).all()) and m.kernel == "w8a8_fused"


@pytest.mark.slow
def test_bench_qlinear_prints_eager_and_fused_side_by_side(capsys):
    """`bench qlinear` on the CPU: one tiny linear, eager vs inductor-fused, fewer kernels and bytes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_qlinear import main

    assert main(["--shapes", "tiny", "--linear", "qkvo", "--repeats", "1", "--dtype", "bf16"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("qkvo"))
    kernels, mb = row.split()[2], row.split()[3]
    e_ops, f_ops = int(kernels.split("/")[0]), int(kernels.split("/")[1].split("(")[0])
    e_mb, f_mb = (float(v) for v in mb.split("/"))
    assert f_ops < e_ops and f_mb < e_mb


def test_linear_kernels_counts_what_each_layer_runs(wxb):
    """`linear_kernels` (for `bench speed`): the CPU's auto pick is the reference; forced kernels stay."""
    from liveavatar_lite.runtime.qlinear import linear_kernels

    w, _, b = wxb
    root = nn.Sequential(_qlinear(QuantType.INT8, w, b), _qlinear(QuantType.INT8, w, b, kernel="w8a8_fused"),
                         _qlinear(QuantType.FP8, w, b), nn.Linear(K, N))
    assert linear_kernels(root, "cpu") == {"reference": 2, "w8a8_fused": 1}
