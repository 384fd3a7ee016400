"""Strict DiT loading from the upstream layout with the LoRA merged in fp32 (both PEFT spellings)."""
import json

import pytest
import torch

from liveavatar_lite.artifact.checkpoint import CheckpointDir, LoraWeights
from liveavatar_lite.artifact.dit_loading import load_dit
from liveavatar_lite.errors import CheckpointError


def _lora(ck_path):
    return LoraWeights.open(ck_path / "liveavatar.safetensors", alpha=64.0)


def test_lora_is_merged_in_fp32(tiny_ckpt):
    ck = CheckpointDir(tiny_ckpt)
    lora = _lora(tiny_ckpt)
    model = load_dit(ck, lora, dtype=torch.float32)
    key = "blocks.1.self_attn.q.weight"
    base = ck.read_dit_tensor(key).float()
    delta = lora.delta("blocks.1.self_attn.q")
    torch.testing.assert_close(model.state_dict()[key], base + delta, rtol=0, atol=0)
    assert delta.abs().max() > 0
    # a Linear with no LoRA (time embedding) is the stored tensor
    torch.testing.assert_close(model.time_embedding[0].weight, ck.read_dit_tensor("time_embedding.0.weight").float())
    assert "audio_injector.injector.0.q" in lora.targets


def test_plain_and_peft_spellings_load_the_same_model(tiny_ckpt, tiny_ckpt_plain_lora):
    a = load_dit(CheckpointDir(tiny_ckpt), _lora(tiny_ckpt), dtype=torch.bfloat16)
    b = load_dit(CheckpointDir(tiny_ckpt_plain_lora), _lora(tiny_ckpt_plain_lora), dtype=torch.bfloat16)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.compute_dtype == torch.bfloat16


def test_config_mismatch_is_a_checkpoint_error(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in tiny_ckpt.iterdir():
        if p.is_file():
            (bad / p.name).symlink_to(p)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["ffn_dim"] = cfg["ffn_dim"] * 2
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ffn"):
        load_dit(CheckpointDir(bad), None)


def test_loaded_checkpoint_generates_a_block(tiny_ckpt):
    from liveavatar_lite.pipeline.generator import CausalGenerator, GenerationInputs

    model = load_dit(CheckpointDir(tiny_ckpt), _lora(tiny_ckpt), dtype=torch.bfloat16)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    gi = GenerationInputs(
        text=torch.randn(5, cfg.text_dim, generator=g),
        audio=torch.randn(cfg.audio_layers, cfg.audio_dim, 48, generator=g),
        ref_latents=torch.randn(16, 1, 8, 12, generator=g),
        motion_latents=torch.randn(16, 19, 8, 12, generator=g),
    )
    out = CausalGenerator(model, gi, seed=3).next_block()
    assert out.latents.shape == (16, 3, 8, 12) and out.latents.dtype == torch.bfloat16
    assert torch.isfinite(out.latents.float()).all()
