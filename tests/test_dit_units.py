"""forward_unit(i) reads only streaming unit i's weights, and runs under functional_call."""
import torch
from dit_fixtures import golden_case, load_model

from liveavatar_lite.config import PRESETS
from liveavatar_lite.model.units import unit_keys
from liveavatar_lite.runtime.kv_cache import RingKVCache, SinkKVCache, layer_kv

CFG = PRESETS["tiny"].dit


def _block_inputs(model, inputs):
    sink = SinkKVCache(CFG.num_layers, dtype=torch.float32)
    with torch.no_grad():
        text = model.embed_text(inputs["text"])
        x, ctx = model.prepare_sink(inputs["ref"], inputs["motion"], text)
        model(x, ctx, lambda i: layer_kv(None, sink, i))
        x, ctx = model.prepare_block(inputs["noise"][:, :3], 857.0, 0, inputs["audio"][..., :12], text, 10)
    return x, ctx, sink


class _Unit(torch.nn.Module):
    """Exposes model.forward_unit as forward, for torch.func.functional_call."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, i, x, ctx, kv):
        return self.m.forward_unit(i, x, ctx, kv)


def _run_unit(model, i, x, ctx, sink, params=None):
    ring = RingKVCache(CFG.num_layers, 192, CFG.num_heads, CFG.head_dim, torch.float32)
    ring.begin(0, x.shape[1])
    kv = layer_kv(ring, sink, i)
    with torch.no_grad():
        if params is None:
            return model.forward_unit(i, x, ctx, kv)
        prefixed = {f"m.{k}": v for k, v in params.items()}
        return torch.func.functional_call(_Unit(model), prefixed, (i, x, ctx, kv), strict=False)


def test_unit_reads_no_other_weights():
    sd, inputs = golden_case(CFG)
    model = load_model(CFG, sd)
    x, ctx, sink = _block_inputs(model, inputs)
    for i in range(CFG.num_layers):
        want = _run_unit(model, i, x, ctx, sink)
        own = set(unit_keys(CFG, i))
        poisoned = load_model(CFG, {k: (v if k in own else torch.full_like(v, float("nan"))) for k, v in sd.items()})
        got = _run_unit(poisoned, i, x, ctx, sink)
        assert torch.isfinite(got).all(), f"unit {i} read a weight outside unit_keys"
        assert torch.equal(got, want)


def test_functional_call_with_streamed_weights():
    sd, inputs = golden_case(CFG)
    model = load_model(CFG, sd)
    x, ctx, sink = _block_inputs(model, inputs)
    i = CFG.audio_inject_layers[1]  # an inject layer: block + injector j=1
    want = _run_unit(model, i, x, ctx, sink)
    # a model holding garbage for unit i, given the real unit weights through functional_call
    garbage = load_model(CFG, {k: (torch.zeros_like(v) if k in unit_keys(CFG, i) else v) for k, v in sd.items()})
    got = _run_unit(garbage, i, x, ctx, sink, params={k: sd[k] for k in unit_keys(CFG, i)})
    assert torch.equal(got, want)
