"""umT5 encoder: key layout, numerics against Wan's encoder (golden), prompt tokenization."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_components import write_tiny_tokenizer

from liveavatar_lite.conditioning.text_tokenizer import (
    clean_prompt,
    load_tokenizer,
    tokenize,
)
from liveavatar_lite.config import PRESETS, T5Config
from liveavatar_lite.errors import CheckpointError
from liveavatar_lite.model.t5 import UMT5Encoder, _clamp_fp16_overflow, encode_prompt

GOLDEN = Path(__file__).parent / "golden" / "cond"


def _golden_t5() -> tuple[UMT5Encoder, dict[str, torch.Tensor], dict]:
    with safe_open(str(GOLDEN / "t5.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = T5Config(**json.loads(meta["config"]))
    enc = UMT5Encoder(cfg).eval()
    weights = {k[len("weight."):]: v.float() for k, v in tensors.items() if k.startswith("weight.")}
    enc.load_state_dict(weights, strict=True)
    return enc, tensors, meta


def test_meta_build_matches_umt5_xxl_manifest(reference_dir: Path) -> None:
    ref = json.loads((reference_dir / "wan_t5_umt5xxl_enc_keys.json").read_text())
    with torch.device("meta"):
        enc = UMT5Encoder(T5Config())
    sd = enc.state_dict()
    assert len(sd) == ref["num_tensors"] == 242
    assert sum(v.numel() for v in sd.values()) == ref["total_params"]
    for t in ref["tensors"]:  # token_embedding, blocks.0.*, norm
        assert list(sd[t["key"]].shape) == t["shape"], t["key"]


def test_tiny_preset_keys() -> None:
    cfg = PRESETS["tiny"].t5
    with torch.device("meta"):
        sd = UMT5Encoder(cfg).state_dict()
    assert sd["token_embedding.weight"].shape == (cfg.vocab, cfg.dim)
    assert sd["blocks.1.pos_embedding.embedding.weight"].shape == (cfg.num_buckets, cfg.num_heads)
    assert sd["blocks.0.ffn.gate.0.weight"].shape == (cfg.dim_ffn, cfg.dim)
    assert len(sd) == 2 + 10 * cfg.num_layers


def test_relative_buckets_match_upstream() -> None:
    enc, g, meta = _golden_t5()
    rel = torch.arange(-300, 301)[None]
    assert torch.equal(enc.blocks[0].pos_embedding.bucket(rel)[0].int(), g["buckets"])


def test_fp32_matches_upstream_padded_and_cut() -> None:
    enc, g, _ = _golden_t5()
    ids, mask, ref = g["ids"], g["mask"], g["out_fp32"]
    with torch.no_grad():
        full = enc(ids, mask)
    lens = mask.sum(1).tolist()
    for i, n in enumerate(lens):  # padded positions are don't-care upstream too (cut away)
        assert (full[i, :n] - ref[i, :n]).abs().max() < 1e-5
    cut = encode_prompt(enc, ids, mask)
    assert [c.shape[0] for c in cut] == lens
    for i, n in enumerate(lens):
        assert (cut[i] - ref[i, :n]).abs().max() < 1e-5


def test_bf16_matches_upstream() -> None:
    enc, g, _ = _golden_t5()
    enc = enc.to(torch.bfloat16)
    ids, mask, ref = g["ids"], g["mask"], g["out_bf16"].float()
    with torch.no_grad():
        full = enc(ids, mask).float()
    for i, n in enumerate(mask.sum(1).tolist()):
        # same op order as upstream (bit-exact on the machine that made the golden); allow 1 ulp at |x|~4
        assert (full[i, :n] - ref[i, :n]).abs().max() <= 3.2e-2


def test_fp16_overflow_is_clamped() -> None:
    x = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=torch.float16)
    y = _clamp_fp16_overflow(x)
    assert torch.isfinite(y).all() and y[2] == 1.0
    z = torch.tensor([float("inf")], dtype=torch.float32)
    assert torch.isinf(_clamp_fp16_overflow(z)).all()  # fp32 is left alone, as upstream


def test_tokenize_matches_upstream_wrapper(tmp_path: Path) -> None:
    spec = json.loads((GOLDEN / "tokenize.json").read_text())
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok", spec["vocab_size"]))
    ids, mask = tokenize(tok, spec["prompts"], text_len=spec["text_len"])
    assert ids.tolist() == spec["ids"]
    assert mask.tolist() == spec["mask"]


def test_tiny_tokenizer_loads_with_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = write_tiny_tokenizer(tmp_path / "umt5", 384)
    assert {p.name for p in d.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tok = AutoTokenizer.from_pretrained(str(d))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids, mask = tokenize(tok, ["a person talking to the camera", "x" * 2000], text_len=512)
    assert ids.shape == mask.shape == (2, 512)
    assert int(ids.max()) < 384
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all()  # </s> then padding
    assert mask[1].all()  # truncated to 512


def test_clean_prompt() -> None:
    assert clean_prompt("  a\n\tb   &amp;amp; c  ") == "a b & c"


def test_load_tokenizer_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_encode_prompt_end_to_end_tiny(tmp_path: Path) -> None:
    cfg = PRESETS["tiny"].t5
    torch.manual_seed(0)
    enc = UMT5Encoder(cfg).eval()
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok", cfg.vocab))
    ids, mask = tokenize(tok, ["a man talks", "a woman sings slowly"], text_len=cfg.text_len)
    embs = encode_prompt(enc, ids, mask)
    assert [e.shape for e in embs] == [(int(m.sum()), cfg.dim) for m in mask]
    with torch.no_grad():
        padded = enc(ids, mask)
    for e, p, m in zip(embs, padded, mask):
        assert (e - p[: int(m.sum())]).abs().max() < 1e-5  # cutting before the forward changes nothing
