"""The attention kernel choice (runtime/attention.py): resolution per device, one-line refusals,
what the model's attend() calls, what telemetry records, and that it traces without graph breaks."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from liveavatar_lite.config import PRESETS
from liveavatar_lite.errors import UserError
from liveavatar_lite.model.dit_blocks import CrossAttention, attend
from liveavatar_lite.runtime.attention import (
    CHOICES,
    AttentionKernel,
    attention_record,
    auto_order,
    resolve_attention,
    use_attention,
)

CPU = torch.device("cpu")


def _qkv(lq: int = 24, lk: int = 40, n: int = 2, d: int = 128, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, length, d, generator=g) for length in (lq, lk, lk))


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64: the definition every kernel is held to."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_cli_choices_are_the_runtime_choices():
    from liveavatar_lite.commands.generate_cmd import ATTENTION_CHOICES

    assert ATTENTION_CHOICES == CHOICES


def test_auto_on_cpu_keeps_torchs_own_pick_and_records_it():
    k = resolve_attention("auto", CPU, torch.bfloat16, head_dim=128)
    assert k.name == auto_order(CPU)[0] == "flash" and k.fallbacks == ("math",)
    assert k.record() == {"attention": "flash", "attention_requested": "auto"}
    sdpa = resolve_attention("sdpa", CPU, torch.float32, head_dim=128)
    assert not sdpa.pinned and sdpa.record() == {"attention": "sdpa:flash", "attention_requested": "sdpa"}


@pytest.mark.parametrize("choice", ["auto", "sdpa", "flash", "math"])
def test_each_cpu_kernel_computes_attention(choice):
    """Every kernel that runs here against the float64 definition: fp32 softmax and sums over
    <= 40 keys of O(1) values: relative error ~ 1e-6; 1e-5 leaves margin for any CPU's SIMD order."""
    q, k, v = _qkv()
    kern = resolve_attention(choice, CPU, torch.float32, head_dim=128)
    got = kern(q, k, v).double()
    want = _naive(q, k, v)
    assert float((got - want).norm() / want.norm()) <= 1e-5


@pytest.mark.parametrize("choice,match", [
    ("cudnn", "--attention cudnn needs a CUDA GPU; this run is on cpu"),
    ("efficient", "--attention efficient needs a CUDA GPU"),
    ("sage", "--attention sage needs a CUDA GPU"),
    ("flashy", "unknown attention 'flashy'; choose one of auto, sdpa"),
])
def test_unavailable_choices_are_one_line_errors(choice, match):
    with pytest.raises(UserError, match=match) as e:
        resolve_attention(choice, CPU)
    assert "\n" not in str(e.value)


def test_sage_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"needs the sageattention package: pip install 'liveavatar-lite\[attention\]'"):
        resolve_attention("sage", torch.device("cuda"))  # the device check passes; the import does not


def test_sage_refuses_head_dims_its_kernels_lack(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", type(sys)("sageattention"))  # a stand-in package
    with pytest.raises(UserError, match=r"head dims \(64, 96, 128\); this model's is 80"):
        resolve_attention("sage", torch.device("cuda"), head_dim=80)
    assert resolve_attention("sage", torch.device("cuda"), head_dim=128).record()["attention"] == "sage"


def test_sage_wrapper_centres_k_out_of_place(monkeypatch):
    """The sage kernel passes K minus its mean over the keys (smooth_k off: sageattention would
    subtract in place, and the text K/V cache must not change); softmax is shift-invariant per
    query, so with an exact stand-in for sageattn the result is attention itself."""
    import types

    calls = []

    def fake_sageattn(q, k, v, tensor_layout, is_causal, smooth_k):
        calls.append((tensor_layout, is_causal, smooth_k, float(k.mean(dim=2).abs().max())))
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=fake_sageattn))
    q, k, v = _qkv()
    k = k + 3.0  # a large common offset, as real keys have
    k_before = k.clone()
    out = AttentionKernel("sage", "sage")(q, k, v)
    assert torch.equal(k, k_before)
    (layout, causal, smooth, mean), = calls
    assert (layout, causal, smooth) == ("HND", False, False) and mean < 1e-5
    want = _naive(q, k, v)
    assert float((out.double() - want).norm() / want.norm()) <= 1e-5


def test_attend_calls_the_kernel_it_is_given():
    """attend() passes [B, n, L, d] views to the kernel and returns [B, Lq, n*d]; None is torch's SDPA."""
    q, k, v = (t.transpose(1, 2) for t in _qkv())  # attend takes [B, L, n, d]
    seen = []

    def spy(a, b, c):
        seen.append((a.shape, b.shape))
        return F.scaled_dot_product_attention(a, b, c)

    out = attend(q, k, v, False, spy)
    assert seen == [((1, 2, 24, 128), (1, 2, 40, 128))] and out.shape == (1, 24, 256)
    assert torch.equal(out, attend(q, k, v, False))


def test_use_attention_reaches_every_attention_module_and_is_recorded():
    from liveavatar_lite.model.dit import WanS2VDiT

    with torch.device("meta"):
        dit = WanS2VDiT(PRESETS["tiny"].dit)
    assert attention_record(dit) == {"attention": "sdpa", "attention_requested": None}
    kern = resolve_attention("math", CPU, torch.float32)
    count = use_attention(dit, kern)
    # self + cross attention per block, plus the audio injectors' cross-attentions
    blocks = len(dit.blocks)
    assert count >= 2 * blocks
    assert all(m.attn_kernel is kern for m in dit.modules() if hasattr(m, "attn_kernel"))
    assert attention_record(dit) == {"attention": "math", "attention_requested": "math"}


def test_renderer_layout_line_records_the_attention():
    """telemetry's `layout` line (ArtifactRenderer.layout) carries the installed kernel."""
    from types import SimpleNamespace

    from liveavatar_lite.pipeline.render import ArtifactRenderer

    attn = CrossAttention(256, 2, 1e-6)
    use_attention(attn, AttentionKernel("math", "math"))
    runtime = SimpleNamespace(layout=lambda: {"streamed_units": 0}, dit=attn, device=CPU)
    r = ArtifactRenderer(None, None, runtime, 4, plan=SimpleNamespace(decode_latents_per_call=3))
    assert r.layout() == {"streamed_units": 0, "decode_latents_per_call": 3,
                          "attention": "math", "attention_requested": "math", "linear_kernels": {}}
    # a rank of `--ranks N` that decodes reports the same layout fields, and the decoder's counters
    from liveavatar_lite.pipeline.multirank.coordinator import PipelineRenderer

    runtime.copy_counters = lambda: {"copy_wait_weights_s": 0.0}
    ranked = PipelineRenderer(None, None, runtime, 4, plan=SimpleNamespace(decode_latents_per_call=3))
    assert ranked.layout() == r.layout()
    assert ranked.counters() == {"copy_wait_weights_s": 0.0, "decode_s": 0.0, "decode_exposed_s": 0.0,
                                 "decode_hidden_s": 0.0}
    decode_only = PipelineRenderer(None, None, None, 4, plan=SimpleNamespace(decode_latents_per_call=3))
    assert decode_only.layout() == {"decode_latents_per_call": 3}
    assert decode_only.counters() == {"decode_s": 0.0, "decode_exposed_s": 0.0, "decode_hidden_s": 0.0}


def test_cross_attention_with_a_chosen_kernel_traces_without_graph_breaks():
    """What i21graph compiles as one graph: a module whose attend() calls the chosen kernel
    (an auto kernel with fallbacks, entered through sdpa_kernel) must not break the graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    attn = CrossAttention(256, 2, 1e-6)
    use_attention(attn, resolve_attention("auto", CPU, torch.bfloat16))
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 24, 256, generator=g), torch.randn(1, 7, 256, generator=g)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        got = torch.compile(attn, fullgraph=True, backend="eager")(x, ctx, True)
        want = attn(x, ctx, True)
    assert dict(counters["graph_break"]) == {}
    assert torch.equal(got, want)  # the "eager" backend runs the traced ops as they are


SAGE_REFUSED = r"--attention sage needs (a CUDA GPU|the sageattention package)"  # without / with a GPU


def test_generate_refuses_an_unavailable_attention_before_loading(tiny_artifact, media, tmp_path, capsys,
                                                                  monkeypatch):
    import re

    from liveavatar_lite.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "sageattention", None)  # not installed, on any machine
    out = tmp_path / "o.mp4"
    rc = cli_main(["generate", "--artifact", str(tiny_artifact), "--image", str(media / "photo.png"),
                   "--audio", str(media / "speech.wav"), "--prompt", "hi", "-o", str(out), "--num-clip", "1",
                   "--attention", "sage", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and re.search(SAGE_REFUSED, err[0])


def test_pipeline_takes_the_attention(tiny_artifact, monkeypatch):
    from liveavatar_lite.pipeline.pipeline import Pipeline
    from liveavatar_lite.pipeline.request import PipelineOptions

    monkeypatch.setitem(sys.modules, "sageattention", None)
    with pytest.raises(UserError, match=SAGE_REFUSED):  # refused before anything loads
        Pipeline.from_artifact(tiny_artifact, attention="sage", progress=False)
    p = Pipeline.from_options(PipelineOptions(tiny_artifact, attention="math", progress=False))  # loads nothing yet
    assert p.backend.attention.record() == {"attention": "math", "attention_requested": "math"}


@pytest.mark.parametrize("capability,order", [
    ((7, 5), ("efficient", "math")),  # Turing: no flash kernel
    ((8, 0), ("flash", "efficient", "math")), ((8, 9), ("flash", "efficient", "math")),
    ((9, 0), ("cudnn", "flash", "efficient", "math")),  # Hopper: cuDNN first
    ((10, 0), ("flash", "efficient", "math")), ((12, 0), ("flash", "efficient", "math")),  # Blackwell, RTX 5090
])
def test_auto_order_per_capability(capability, order):
    assert auto_order(torch.device("cuda"), capability) == order  # no GPU needed: the capability is passed in


def test_opening_a_backend_probes_no_device(tiny_artifact, monkeypatch):
    """serve's and farm's parents open the backend only to validate: no probe (no CUDA context)
    there; the probe runs when the backend's runtime is built (its `attention`, in `_runtime_for`)."""
    from liveavatar_lite.pipeline.render import ArtifactBackend
    from liveavatar_lite.pipeline.request import PipelineOptions
    from liveavatar_lite.runtime import attention

    def no_probe(*args, **kwargs):
        raise AssertionError("probed the device while opening the backend")

    monkeypatch.setattr(attention, "_probe", no_probe)
    monkeypatch.setattr(attention, "_torch_pick", no_probe)
    for choice in ("auto", "sdpa", "math", "flash"):
        backend = ArtifactBackend.open(PipelineOptions(tiny_artifact, attention=choice, progress=False))
    with pytest.raises(UserError, match="--attention cudnn needs a CUDA GPU"):  # cheap checks still refuse
        ArtifactBackend.open(PipelineOptions(tiny_artifact, attention="cudnn", progress=False))
    with pytest.raises(AssertionError, match="probed the device"):
        _ = backend.attention  # resolved on first use (just before the runtime is built)


@pytest.mark.gpu
def test_cuda_auto_follows_the_architecture():
    dev = torch.device("cuda")
    k = resolve_attention("auto", dev, torch.bfloat16, head_dim=128)
    major = torch.cuda.get_device_capability()[0]
    assert k.name == auto_order(dev)[0] == ("efficient" if major < 8 else "cudnn" if major == 9 else "flash")
    q, kk, v = (t.to(dev, torch.bfloat16) for t in _qkv(lq=256, lk=512))
    got = k(q, kk, v).double().cpu()
    want_t = _naive(*(t.float().cpu() for t in (q, kk, v)))
    assert float((got - want_t).norm() / want_t.norm()) <= 2e-2  # bf16 output rounding (2^-9) + P in bf16


@pytest.mark.gpu
def test_cuda_sage_error_against_sdpa():
    """SageAttention 1 (int8 Q, K per block; fp16 P.V) against bf16 SDPA and the float64 definition at a
    14B head shape (40 heads x 128, 3168 queries, 15312 keys = ring + sink): its error is printed and
    bounded by a few int8 steps (the published figure: cosine similarity > 0.999 on video DiTs)."""
    pytest.importorskip("sageattention", reason="the [attention] extra is not installed here")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 40, n, 128, generator=g, device=dev, dtype=torch.bfloat16) for n in (3168, 15312, 15312))
    sage = resolve_attention("sage", dev, torch.bfloat16, head_dim=128)
    sdpa = resolve_attention("auto", dev, torch.bfloat16, head_dim=128)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = {n: float((kern(q, k, v).float() - ref).norm() / ref.norm()) for n, kern in (("sage", sage), ("sdpa", sdpa))}
    print(f"relative L2 vs fp32 SDPA: sage {err['sage']:.4f}, {sdpa.name} {err['sdpa']:.4f}")
    assert err["sdpa"] <= 1e-2 and err["sage"] <= 5e-2


def test_a_render_records_the_attention_it_ran(clean_render):
    """The CLI render's telemetry `layout` line names the kernel "auto" resolved to on this machine,
    and the quantized linears' kernels (the tiny int8 artifact: every block linear is int8)."""
    import json

    lines = [json.loads(s) for s in clean_render["telemetry"].read_text().splitlines()]
    layout = next(r for r in lines if r.get("event") == "layout")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    want = resolve_attention("auto", dev, torch.bfloat16, PRESETS["tiny"].dit.head_dim).record()
    assert {k: layout[k] for k in want} == want
    kernels = layout["linear_kernels"]
    assert sum(kernels.values()) > 0 and set(kernels) <= {"reference", "w8a8", "w8a16"}
