"""QuantLinear kernels against the pure-torch reference (dequantize + F.linear) and the float weight."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.runtime.qlinear import (
    QuantLinear,
    linear_w8a8,
    quantize_per_token_int8,
    swap_linears,
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
    code = fast._nf4_code
    fast(x)
    assert fast._nf4_code is code  # the lookup table is built once, not copied to the device per call


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
    w, x, b = wxb
    m = _qlinear(qtype, w, b, kernel=kernel).cuda()
    m.bias.data = m.bias.data.bfloat16()
    y = m(x.cuda().bfloat16()).float().cpu()
    assert _snr_db(nn.functional.linear(x, w, b), y) >= min_db
