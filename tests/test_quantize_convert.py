"""End to end on tiny checkpoints: every component, LoRA merged, policy respected, deterministic bytes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quantize_fixtures import write_dit_checkpoint

from liveavatar_lite.artifact.checkpoint import (
    CheckpointDir,
    LoraWeights,
    load_pth,
    merge_lora,
)
from liveavatar_lite.artifact.format import read_manifest, read_unit, verify_artifact
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.cli import main
from quantize.convert import ConvertOptions, convert


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory) -> Path:
    return write_dit_checkpoint(tmp_path_factory.mktemp("q") / "ck")


def test_full_checkpoint_int8_with_lora(tiny_ckpt, tmp_path):
    out = tmp_path / "art"
    lora_path = tiny_ckpt / "liveavatar.safetensors"
    m = convert(ConvertOptions(tiny_ckpt, out, QuantType.INT8, lora=lora_path, vae_onnx=False, progress=False))
    assert m.components == ("dit", "t5", "vae", "audio", "tokenizer")
    assert verify_artifact(out, read_manifest(out), checksums=True) == []
    ck = CheckpointDir(tiny_ckpt)
    lora = LoraWeights.open(lora_path)

    buf, views = read_unit(out, "block_002", manifest=m)
    q = views["blocks.2.ffn.0.weight"]
    assert q.entry.qtype is QuantType.INT8
    merged = merge_lora(ck.read_dit_tensor("blocks.2.ffn.0.weight"), lora.delta("blocks.2.ffn.0"))
    err = (q.dequantize(buf, torch.float32) - merged).abs().max() / merged.abs().max()
    assert err < 1 / 127  # within half a step of the per-row grid (max row <= global max)
    for key in ("blocks.2.modulation", "blocks.2.norm3.weight", "blocks.2.ffn.0.bias"):
        assert views[key].entry.qtype is QuantType.BF16
        assert torch.equal(views[key].parts(buf)["data"], ck.read_dit_tensor(key))

    buf, views = read_unit(out, "resident", manifest=m)
    for key in ("time_projection.1.weight", "head.head.weight", "text_embedding.0.weight",
                "casual_audio_encoder.encoder.final_linear.weight", "trainable_cond_mask.weight"):
        assert views[key].entry.qtype is QuantType.BF16, key
        assert torch.equal(views[key].parts(buf)["data"], ck.read_dit_tensor(key))

    buf, views = read_unit(out, "t5", manifest=m)
    t5 = load_pth(ck.t5_path)
    assert views["blocks.0.attn.q.weight"].entry.qtype is QuantType.INT8
    assert views["token_embedding.weight"].entry.qtype is QuantType.BF16
    assert torch.equal(views["token_embedding.weight"].parts(buf)["data"], t5["token_embedding.weight"])
    buf, views = read_unit(out, "vae", manifest=m)
    vae = load_pth(ck.vae_path)
    assert all(torch.equal(views[k].parts(buf)["data"], v) for k, v in vae.items())
    assert (out / m.paths["audio_dir"] / "config.json").read_bytes() == (ck.wav2vec_dir / "config.json").read_bytes()
    assert (out / m.paths["tokenizer_dir"]).is_dir()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "nf4", "bf16"])
def test_cli_each_format_dit_only(dit_ckpt, tmp_path, fmt):
    out = tmp_path / fmt
    assert main(["quantize", str(dit_ckpt), str(out), "--format", fmt, "--components", "dit",
                 "--group-size", "64", "--no-progress"]) == 0
    m = read_manifest(out)
    qtypes = {t.qtype for u in m.units for t in u.tensors}
    assert qtypes == ({QuantType.BF16} | ({QuantType(fmt)} if fmt != "bf16" else set()))
    groups = {t.group_size for u in m.units for t in u.tensors if t.qtype is QuantType.INT4}
    assert groups <= {64}
    assert [u.name for u in m.block_units] == [f"block_{i:03d}" for i in range(m.dit.num_layers)]
    assert main(["inspect", str(out), "--verify"]) == 0


def test_keep_bf16_globs_and_identical_reruns(dit_ckpt, tmp_path):
    opts = dict(format=QuantType.INT4, keep_bf16=("blocks.1.*",), components=("dit",), progress=False)
    a = convert(ConvertOptions(dit_ckpt, tmp_path / "a", **opts))
    convert(ConvertOptions(dit_ckpt, tmp_path / "b", **opts))
    assert all(t.qtype is QuantType.BF16 for t in a.unit("block_001").tensors)
    assert any(t.qtype is QuantType.INT4 for t in a.unit("block_000").tensors)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # re-running on a finished artifact keeps it as is
    convert(ConvertOptions(dit_ckpt, tmp_path / "a", **opts))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_inspect_json(dit_ckpt, tmp_path, capsys):
    out = tmp_path / "x"
    convert(ConvertOptions(dit_ckpt, out, QuantType.INT8, components=("dit",), progress=False))
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["verification"]["ok"] and info["total_bytes"] == read_manifest(out).total_nbytes
    assert set(info["bytes_by_qtype"]) == {"bf16", "int8"}
