"""WanS2VDiT builds from DiTConfig alone with upstream's exact state-dict keys and shapes."""
import json

import pytest
import torch

from liveavatar_lite.config import PRESETS
from liveavatar_lite.model.dit import WanS2VDiT
from liveavatar_lite.model.units import resident_keys, unit_keys, unit_of_key


def _meta_model(preset: str) -> WanS2VDiT:
    with torch.device("meta"):
        return WanS2VDiT(PRESETS[preset].dit)


def test_14b_keys_and_shapes_match_upstream_manifest(reference_dir):
    manifest = json.loads((reference_dir / "wan22_s2v_14b_keys.json").read_text())
    want = [(t["key"], tuple(t["shape"])) for t in manifest["tensors"]]
    got = [(k, tuple(v.shape)) for k, v in _meta_model("14b").state_dict().items()]
    assert len(got) == 1260
    assert sorted(got) == sorted(want)


@pytest.mark.parametrize("preset", ["tiny", "14b"])
def test_units_partition_the_state_dict(preset):
    cfg = PRESETS[preset].dit
    keys = list(_meta_model(preset).state_dict().keys())
    units = [unit_keys(cfg, i) for i in range(cfg.num_layers)]
    flat = [k for u in units for k in u] + resident_keys(cfg)
    assert sorted(flat) == sorted(keys)  # every key exactly once
    for i, u in enumerate(units):
        assert all(unit_of_key(cfg, k) == i for k in u)
    first = cfg.audio_inject_layers[0]
    assert "audio_injector.injector.0.q.weight" in unit_keys(cfg, first)
    assert "audio_injector.injector_adain_layers.0.linear.weight" in unit_keys(cfg, first)
    assert all(unit_of_key(cfg, k) is None for k in resident_keys(cfg))


def test_tiny_builds_and_every_linear_is_plain():
    model = _meta_model("tiny")
    block = model.blocks[0]
    for name in ("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2"):
        assert type(block.get_submodule(name)) is torch.nn.Linear
    assert type(model.audio_injector.injector[0].v) is torch.nn.Linear
