"""The artifact spec: aligned safetensors layout, manifest round trip, version refusal, unit reading."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from liveavatar_lite.artifact.format import (
    ALIGN,
    FORMAT_VERSION,
    MANIFEST_FILE,
    Manifest,
    QuantSettings,
    SourceFile,
    SourceIdentity,
    TensorSpec,
    UnitEntry,
    layout_file,
    manifest_bytes,
    read_manifest,
    read_unit,
    write_manifest,
)
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import PRESETS
from liveavatar_lite.errors import ArtifactError
from quantize.quantizers import quantize_tensor
from quantize.writer import write_unit_file

SPECS = [
    TensorSpec("a.weight", QuantType.INT8, (10, 64), None, "BF16"),
    TensorSpec("odd", QuantType.BF16, (1, 25, 1, 1), None, "BF16"),  # 50 bytes: forces padding
    TensorSpec("c.weight", QuantType.INT4, (8, 128), 64, "BF16"),
    TensorSpec("d.weight", QuantType.NF4, (4, 64), None, "BF16"),
    TensorSpec("e.weight", QuantType.FP8, (3, 32), None, "BF16"),
]


def _source(name: str) -> torch.Tensor:
    spec = next(s for s in SPECS if s.name == name)
    g = torch.Generator().manual_seed(len(name))
    return torch.randn(spec.logical_shape, generator=g)


def _write_artifact(root: Path) -> Manifest:
    layout = layout_file(SPECS, "block_000")
    rel = "units/block_000.safetensors"
    sha = write_unit_file(root / rel, layout, lambda e: quantize_tensor(e.qtype, _source(e.name), e.group_size))
    unit = UnitEntry("block_000", rel, "dit_block", 0, len(layout.header), layout.data_nbytes, sha, layout.tensors)
    m = Manifest(
        dit=PRESETS["tiny"].dit,
        source=SourceIdentity((SourceFile("x.safetensors", 1),), "c" * 64, None),
        quant=QuantSettings("int8", 128, ("blocks.0.*",)),
        units=(unit,),
        components=("dit",),
    )
    write_manifest(root, m)
    return m


def test_layout_is_aligned_and_valid_safetensors(tmp_path):
    _write_artifact(tmp_path)
    path = tmp_path / "units/block_000.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % ALIGN == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format_version"] == str(FORMAT_VERSION)
    for key, e in header.items():
        if key != "__metadata__" and not key.startswith("__pad_"):
            assert e["data_offsets"][0] % ALIGN == 0, key
    with safe_open(str(path), "pt") as f:  # the stock reader accepts our padding
        q = quantize_tensor(QuantType.INT4, _source("c.weight"), 64)
        assert torch.equal(f.get_tensor("c.weight.zero"), q["zero"])
        assert torch.equal(f.get_tensor("odd"), _source("odd").to(torch.bfloat16))


def test_manifest_roundtrip_and_determinism(tmp_path):
    m = _write_artifact(tmp_path)
    back = read_manifest(tmp_path)
    assert back == m
    assert manifest_bytes(back) == (tmp_path / MANIFEST_FILE).read_bytes()


def test_read_unit_views_and_out_buffer(tmp_path):
    m = _write_artifact(tmp_path)
    unit = m.unit("block_000")
    out = torch.zeros(unit.data_nbytes + 128, dtype=torch.uint8)
    buf, views = read_unit(tmp_path, "block_000", manifest=m, out=out, verify=True)
    assert buf.data_ptr() == out.data_ptr() and "__pad_1__" not in views
    for spec in SPECS:
        parts = views[spec.name].parts(buf)
        for p in views[spec.name].entry.parts:
            assert parts[p.role].data_ptr() % ALIGN == 0
        want = quantize_tensor(spec.qtype, _source(spec.name), spec.group_size)
        assert all(torch.equal(parts[r], want[r]) for r in want)
    w = views["a.weight"].dequantize(buf, torch.float32)
    torch.testing.assert_close(w, _source("a.weight"), atol=2e-2, rtol=0)


def test_unknown_version_and_missing_manifest_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path)
    _write_artifact(tmp_path)
    d = json.loads((tmp_path / MANIFEST_FILE).read_text())
    d["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="unknown format version"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_manifest(tmp_path)


def test_corrupt_unit_is_detected(tmp_path):
    m = _write_artifact(tmp_path)
    path = tmp_path / "units/block_000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    read_unit(tmp_path, "block_000", manifest=m)  # sizes still match: only the checksum can tell
    with pytest.raises(ArtifactError, match="checksum"):
        read_unit(tmp_path, "block_000", manifest=m, verify=True)
    path.write_bytes(bytes(raw[:-64]))
    with pytest.raises(ArtifactError, match="bytes"):
        read_unit(tmp_path, "block_000", manifest=m)


def test_unit_lookup_error(tmp_path):
    m = _write_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="no unit"):
        m.unit("block_999")
    assert replace(m, units=()).total_nbytes == 0
