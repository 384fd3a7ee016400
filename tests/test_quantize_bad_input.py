"""Bad input: one clear line on stderr, a non-zero exit, and nothing half-written in OUT_DIR."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from quantize_fixtures import write_dit_checkpoint
from safetensors.torch import load_file, save_file

import quantize.writer
from liveavatar_lite.cli import main

SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_dit_checkpoint(tmp_path_factory.mktemp("bad") / "ck")


@pytest.fixture
def ck(pristine, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(pristine, dst)
    return dst


def _quantize(ck: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["quantize", str(ck), str(out), "--format", "int8", "--components", "dit", "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_failure(code: int, err: str, out: Path, match: str) -> None:
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("liveavatar-lite quantize: error: "), err
    assert match in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


def _rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_shard(ck, tmp_path, capsys):
    (ck / SHARD2).unlink()
    code, err = _quantize(ck, tmp_path / "out", capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "is missing")


def test_truncated_shard(ck, tmp_path, capsys):
    data = (ck / SHARD1).read_bytes()
    (ck / SHARD1).write_bytes(data[: len(data) // 2])
    code, err = _quantize(ck, tmp_path / "out", capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "truncated")


def test_corrupt_header(ck, tmp_path, capsys):
    data = bytearray((ck / SHARD1).read_bytes())
    data[8:24] = b"\x00garbage!garbage"
    (ck / SHARD1).write_bytes(bytes(data))
    code, err = _quantize(ck, tmp_path / "out", capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "corrupt safetensors header")


def test_wrong_shape(ck, tmp_path, capsys):
    def edit(t):
        key = next(k for k in t if k.endswith("ffn.0.weight"))
        t[key] = t[key][:-1].contiguous()

    _rewrite_shard(ck / SHARD1, edit)
    code, err = _quantize(ck, tmp_path / "out", capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "the model expects")


def test_unexpected_key(ck, tmp_path, capsys):
    _rewrite_shard(ck / SHARD2, lambda t: t.__setitem__("blocks.0.extra.weight", torch.zeros(2, 2)))
    index = json.loads((ck / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["blocks.0.extra.weight"] = SHARD2
    (ck / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    code, err = _quantize(ck, tmp_path / "out", capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "unexpected tensor 'blocks.0.extra.weight'")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_found_mid_conversion(ck, tmp_path, capsys, value):
    # a tensor of the LAST shard: earlier units are already written when it is found
    def edit(t):
        key = max((k for k in t if k.startswith("blocks.") and k.endswith("ffn.2.weight")))
        t[key][0, 0] = value
        edit.key = key

    _rewrite_shard(ck / SHARD2, edit)
    code, err = _quantize(ck, tmp_path / "out", capsys)
    _assert_clean_failure(code, err, tmp_path / "out", f"{edit.key!r} contains NaN or Inf")


def test_lora_key_matching_nothing(ck, tmp_path, capsys):
    lora = load_file(str(ck / "liveavatar.safetensors"))
    lora["base_model.model.blocks.0.nonexistent.lora_A.weight"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    lora["base_model.model.blocks.0.nonexistent.lora_B.weight"] = torch.zeros(4, 8, dtype=torch.bfloat16)
    save_file(lora, str(ck / "liveavatar.safetensors"))
    code, err = _quantize(ck, tmp_path / "out", capsys, "--lora", str(ck / "liveavatar.safetensors"))
    _assert_clean_failure(code, err, tmp_path / "out", "matches no Linear")


def test_out_dir_holding_something_else(ck, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _quantize(ck, out, capsys)
    assert code != 0 and "not empty and not a liveavatar-lite conversion" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_out_dir_from_other_options_needs_force(ck, tmp_path, capsys):
    out = tmp_path / "out"
    assert _quantize(ck, out, capsys)[0] == 0
    code, err = _quantize(ck, out, capsys, "--keep-bf16", "blocks.0.*")
    assert code != 0 and "other inputs or options" in err
    assert _quantize(ck, out, capsys, "--keep-bf16", "blocks.0.*", "--force")[0] == 0


def test_disk_full_keeps_finished_files_and_resumes_identically(ck, tmp_path, capsys, monkeypatch):
    """A full disk mid-conversion: one line, finished unit files stay, a re-run resumes to the same bytes."""
    calls = {"n": 0}
    real = quantize.writer.write_chunk

    def write_until_full(f, data):
        calls["n"] += 1
        if calls["n"] > 150:  # a few files in, mid-file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    with monkeypatch.context() as m:
        m.setattr(quantize.writer, "write_chunk", write_until_full)
        code, err = _quantize(ck, tmp_path / "out", capsys)
    assert calls["n"] > 150 and code != 0
    assert err.count("\n") == 0 and "disk full while writing" in err and "re-run" in err, err
    out = tmp_path / "out"
    kept = sorted(p.name for p in (out / "units").iterdir())
    assert kept and not any(n.endswith(".tmp") for n in kept)  # finished units kept, no half-written file
    assert not (out / "manifest.json").exists()
    assert _quantize(ck, out, capsys)[0] == 0  # space "freed": the same command resumes
    assert _quantize(ck, tmp_path / "clean", capsys)[0] == 0
    for p in sorted((tmp_path / "clean").rglob("*")):
        if p.is_file() and p.name != ".quantize-job.json":
            assert p.read_bytes() == (out / p.relative_to(tmp_path / "clean")).read_bytes(), p.name
