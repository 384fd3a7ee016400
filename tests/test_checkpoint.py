"""The real-layout fixtures and the checkpoint reader: layout, manifests, bad input, LoRA spellings."""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import make_checkpoint as mc
import pytest
import torch

from liveavatar_lite.artifact import checkpoint as ck
from liveavatar_lite.config import PRESETS, DiTConfig
from liveavatar_lite.errors import CheckpointError


def _shards(ckpt: Path) -> list[str]:
    return sorted(set(json.loads((ckpt / ck.DIT_INDEX).read_text())["weight_map"].values()))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- layout, plain libraries


def test_tiny_layout_loads_with_plain_libraries(tiny_ckpt: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    index = json.loads((tiny_ckpt / ck.DIT_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    loaded = {}
    for name in shards:
        loaded.update(load_file(tiny_ckpt / name))
    assert set(loaded) == set(index["weight_map"])
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in loaded.values())

    t5 = torch.load(tiny_ckpt / ck.T5_FILE, weights_only=True, mmap=True)
    assert t5["token_embedding.weight"].shape == (PRESETS["tiny"].t5.vocab, PRESETS["tiny"].t5.dim)
    assert all(t.dtype == torch.bfloat16 for t in t5.values())
    vae = torch.load(tiny_ckpt / ck.VAE_FILE, weights_only=True)
    assert all(t.dtype == torch.float32 for t in vae.values())

    cfg = AutoConfig.from_pretrained(tiny_ckpt / ck.WAV2VEC_DIR)
    assert cfg.model_type == "wav2vec2" and cfg.num_hidden_layers + 1 == PRESETS["tiny"].dit.audio_layers
    assert (tiny_ckpt / ck.WAV2VEC_DIR / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(tiny_ckpt / ck.TOKENIZER_DIR)
    assert len(tok("a talking person")["input_ids"]) > 1

    lora = load_file(tiny_ckpt / ck.LORA_FILE)
    assert all(k.startswith("base_model.model.") for k in lora)
    config = json.loads((tiny_ckpt / ck.DIT_CONFIG).read_text())
    assert config["_class_name"] == "WanModel_S2V" and DiTConfig.from_upstream_json(config) == PRESETS["tiny"].dit


def test_fixture_is_deterministic(tiny_ckpt: Path, tmp_path: Path) -> None:
    again = mc.write_checkpoint("tiny", tmp_path / "again", seed=0, dit_only=True)
    for name in (_shards(tiny_ckpt)[0], ck.LORA_FILE, ck.DIT_INDEX):
        assert _digest(again / name) == _digest(tiny_ckpt / name)
    other = mc.write_checkpoint("tiny", tmp_path / "other", seed=1, dit_only=True)
    assert _digest(other / ck.LORA_FILE) != _digest(tiny_ckpt / ck.LORA_FILE)


# ---------------------------------------------------------------- 14b shapes against upstream's manifests


def test_14b_dit_keys_match_upstream_manifest(reference_dir: Path) -> None:
    ref = json.loads((reference_dir / "wan22_s2v_14b_keys.json").read_text())
    ours = mc.dit_specs(PRESETS["14b"])
    assert [k for k, _ in ours] == [t["key"] for t in ref["tensors"]]
    assert {k: list(s) for k, s in ours} == {t["key"]: t["shape"] for t in ref["tensors"]}
    assert sum(torch.Size(s).numel() for _, s in ours) == ref["total_params"]
    assert DiTConfig.from_upstream_json(ref["config"]) == PRESETS["14b"].dit


def test_14b_sharding_matches_the_download(reference_dir: Path) -> None:
    # The real download has 4 shards of 9.97 / 9.89 / 9.96 / 2.77 GB (LIVEAVATAR.md §2.4).
    shards = mc.shard_plan(mc.dit_specs(PRESETS["14b"]), 2, mc.SHARD_BYTES["14b"])
    sizes = [sum(torch.Size(s).numel() * 2 for _, s in shard) / 1e9 for shard in shards]
    assert len(sizes) == 4 and abs(sum(sizes) - 32.59) < 0.01
    assert all(abs(a - b) < 0.15 for a, b in zip(sizes, [9.97, 9.89, 9.96, 2.77]))


def test_14b_t5_and_vae_keys_match_upstream_manifests(reference_dir: Path) -> None:
    t5_ref = json.loads((reference_dir / "wan_t5_umt5xxl_enc_keys.json").read_text())
    t5 = dict(mc.t5_specs(PRESETS["14b"]))
    assert len(t5) == t5_ref["num_tensors"]
    assert sum(torch.Size(s).numel() for s in t5.values()) == t5_ref["total_params"]
    for t in t5_ref["tensors"]:  # blocks.0.* listed; blocks 1..23 identical
        for layer in range(PRESETS["14b"].t5.num_layers if t["key"].startswith("blocks.0.") else 1):
            assert list(t5[t["key"].replace("blocks.0.", f"blocks.{layer}.")]) == t["shape"]
    vae_ref = json.loads((reference_dir / "wan21_vae_keys.json").read_text())
    # this manifest stores its fields as Python literals inside JSON strings
    vae_tensors = vae_ref["tensors"] if isinstance(vae_ref["tensors"], list) else ast.literal_eval(vae_ref["tensors"])
    assert {k: list(s) for k, s in mc.vae_specs(PRESETS["14b"])} == {t["key"]: t["shape"] for t in vae_tensors}


# ---------------------------------------------------------------- the reader


def test_reader_reads_exact_tensors(tiny_ckpt: Path) -> None:
    from safetensors.torch import load_file

    c = ck.CheckpointDir(tiny_ckpt)
    assert c.dit_config == PRESETS["tiny"].dit
    shard = tiny_ckpt / _shards(tiny_ckpt)[1]
    for key, t in load_file(shard).items():
        assert torch.equal(c.read_dit_tensor(key), t)
        assert c.dit_tensor_info(key).shape == tuple(t.shape)


def test_lora_spellings_give_the_same_merge(tiny_ckpt: Path, tiny_ckpt_plain_lora: Path) -> None:
    a = ck.LoraWeights.open(tiny_ckpt / ck.LORA_FILE)
    b = ck.LoraWeights.open(tiny_ckpt_plain_lora / ck.LORA_FILE)
    cfg = PRESETS["tiny"].dit
    # q,k,v,o (self + cross), ffn.0, ffn.2 per block + q,k,v,o per audio injector
    assert a.targets == b.targets and len(a.targets) == cfg.num_layers * 10 + len(cfg.audio_inject_layers) * 4
    module = "blocks.1.ffn.0"
    da, db = a.delta(module), b.delta(module)
    assert da is not None and db is not None and torch.equal(da, db)
    # alpha / r = 64 / 128 = 0.5, computed in fp32 from the stored bf16 factors
    raw = ck.read_safetensors_header(tiny_ckpt / ck.LORA_FILE)[0]
    A = ck.read_tensor(raw[f"base_model.model.{module}.lora_A.weight"]).float()
    B = ck.read_tensor(raw[f"base_model.model.{module}.lora_B.weight"]).float()
    torch.testing.assert_close(da, 0.5 * B @ A, rtol=0, atol=0)
    c = ck.CheckpointDir(tiny_ckpt)
    a.check_targets({k: c.dit_tensor_info(k).shape for k in c.dit_keys})
    merged = c.read_dit_state_dict(a)[f"{module}.weight"]
    torch.testing.assert_close(merged.float(), (c.read_dit_tensor(f"{module}.weight").float() + da).bfloat16().float())


def test_in_place_lora_merge_is_the_fp32_merge_rounded_once() -> None:
    """The converter's merge (row chunks, in the stored dtype, no full-size fp32 temporaries) equals
    the whole-matrix fp32 merge rounded to bf16, for chunks that split rows unevenly."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 96, generator=g).bfloat16()
    a, b = torch.randn(8, 96, generator=g) * 0.05, torch.randn(37, 8, generator=g) * 0.05
    want = ck.merge_lora(w, 0.5 * (b @ a)).to(torch.bfloat16)
    got = ck.merge_lora_inplace(w.clone(), (a, b, 0.5), chunk_elems=5 * 96 + 7)  # 5 rows per chunk, 37 rows
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_reader_bad_input(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        ck.CheckpointDir(tmp_path / "nope")
    d = _copy(tiny_ckpt, tmp_path / "missing_shard")
    (d / _shards(d)[1]).unlink()
    with pytest.raises(CheckpointError, match="shard listed in .* is missing"):
        ck.CheckpointDir(d)

    d = _copy(tiny_ckpt, tmp_path / "truncated")
    shard = d / _shards(d)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    c = ck.CheckpointDir(d)
    with pytest.raises(CheckpointError, match="truncated"):
        c.read_dit_tensor(next(k for k in c.dit_keys if c._weight_map[k] == shard))

    d = _copy(tiny_ckpt, tmp_path / "corrupt")
    shard = d / _shards(d)[0]
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"\xff\xfe{x"
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        ck.CheckpointDir(d).read_dit_tensor("patch_embedding.weight")

    d = _copy(tiny_ckpt, tmp_path / "motioner")
    cfg = json.loads((d / ck.DIT_CONFIG).read_text())
    cfg["enable_motioner"] = True
    (d / ck.DIT_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="enable_motioner"):
        ck.CheckpointDir(d)
    with pytest.raises(CheckpointError, match="missing"):
        ck.load_pth(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable torch state_dict"):
        ck.load_pth(tmp_path / "junk.pth")


def test_lora_bad_input(tmp_path: Path) -> None:
    bf16 = torch.bfloat16
    one = lambda k, s: [torch.ones(s, dtype=bf16)]  # noqa: E731
    mc.write_safetensors(tmp_path / "odd.safetensors", [("blocks.0.self_attn.q.alpha", (1,))], bf16, one)
    with pytest.raises(CheckpointError, match="not a PEFT LoRA key"):
        ck.LoraWeights.open(tmp_path / "odd.safetensors")
    mc.write_safetensors(tmp_path / "half.safetensors", [("x.lora_A.weight", (4, 8))], bf16, one)
    with pytest.raises(CheckpointError, match="not both"):
        ck.LoraWeights.open(tmp_path / "half.safetensors")
    specs = [("nothing.here.lora_A.weight", (4, 8)), ("nothing.here.lora_B.weight", (6, 4))]
    mc.write_safetensors(tmp_path / "stray.safetensors", specs, bf16, one)
    lora = ck.LoraWeights.open(tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match="matches no Linear"):
        lora.check_targets({"blocks.0.ffn.0.weight": (6, 8)})


def test_materialize_strict_names_the_offending_key() -> None:
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    good = {"0.weight": torch.ones(3, 4), "0.bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="missing tensor '0.bias'"):
        ck.materialize_strict(m, {"0.weight": good["0.weight"]}, "src")
    with pytest.raises(CheckpointError, match=r"'0.weight' has shape \[3, 5\]"):
        ck.materialize_strict(m, {**good, "0.weight": torch.ones(3, 5)}, "src")
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra'"):
        ck.materialize_strict(m, {**good, "extra": torch.ones(1)}, "src")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        ck.materialize_strict(m, {**good, "0.bias": torch.tensor([0.0, float("nan"), 0.0])}, "src")
    out = ck.materialize_strict(m, good, "src", dtype=torch.bfloat16)
    assert out[0].weight.dtype == torch.bfloat16 and out[0].weight.device.type == "cpu"


def test_make_checkpoint_cli_refuses_existing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").mkdir()
    assert mc.main(["--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "exists" in capsys.readouterr().err


def test_pth_file_reads_one_tensor_at_a_time_exactly(tiny_ckpt: Path, tmp_path: Path) -> None:
    pth = ck.PthFile(tiny_ckpt / ck.T5_FILE)
    ref = torch.load(tiny_ckpt / ck.T5_FILE, weights_only=True)
    assert list(pth) == list(ref)
    for key, t in ref.items():
        assert pth.info(key) == (t.dtype, tuple(t.shape))
        assert torch.equal(pth[key], t)
    base = torch.arange(20.0).reshape(4, 5)  # views into one storage, as torch.save keeps them
    torch.save({"full": base, "row": base[1], "transposed": base.t()}, tmp_path / "views.pth")
    views = ck.PthFile(tmp_path / "views.pth")
    assert torch.equal(views["row"], base[1]) and torch.equal(views["transposed"], base.t())
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable torch state_dict"):
        ck.PthFile(tmp_path / "junk.pth")
    torch.save({"obj": {"nested": 1}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a plain state_dict"):
        ck.PthFile(tmp_path / "foreign.pth")
