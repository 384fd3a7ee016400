"""--target-size: per-layer formats from a measurement.json, and the artifact lands under the target."""
from __future__ import annotations

from pathlib import Path

import pytest
from quantize_fixtures import write_dit_checkpoint

from calibration.measurement import (
    FormatError,
    LayerMeasurement,
    Measurement,
    write_measurement,
)
from liveavatar_lite.artifact.checkpoint import CheckpointDir
from liveavatar_lite.artifact.format import read_manifest
from liveavatar_lite.artifact.qtypes import QuantType, stored_nbytes
from liveavatar_lite.cli import main
from quantize.policy import Policy, quantizable
from quantize.source import DitSource

ERR = {QuantType.BF16: 1e-6, QuantType.INT8: 1e-4, QuantType.INT4: 1e-2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("target")
    ck = write_dit_checkpoint(root / "ck")
    src = DitSource(CheckpointDir(ck))
    keys = [k for k in quantizable(Policy(QuantType.INT8), src.shapes) if k.startswith(("blocks.", "audio_injector."))]
    layers = {}
    for i, k in enumerate(keys):
        shape = tuple(src.shapes[k])
        scale = 10.0 if i % 5 == 0 else 1.0  # some layers are more sensitive than others
        layers[k] = LayerMeasurement(shape, 64, {q: FormatError(e * scale, stored_nbytes(q, shape, 128 if q is QuantType.INT4 else None))
                                                  for q, e in ERR.items()})
    m = Measurement(src.cfg, {"config_sha256": "x"}, 128, ("s0",), 1, layers)
    write_measurement(root / "measurement.json", m)
    return ck, root / "measurement.json"


def _sizes(out: Path) -> tuple[int, dict[str, int]]:
    m = read_manifest(out)
    mix: dict[str, int] = {}
    for u in m.units:
        for t in u.tensors:
            mix[t.qtype.value] = mix.get(t.qtype.value, 0) + 1
    return m.total_nbytes, mix


def test_target_size_between_int4_and_bf16(setup, tmp_path):
    ck, meas = setup
    base = ["quantize", str(ck), "--components", "dit", "--no-progress"]
    assert main([base[0], base[1], str(tmp_path / "i4"), *base[2:], "--format", "int4"]) == 0
    assert main([base[0], base[1], str(tmp_path / "i8"), *base[2:], "--format", "int8"]) == 0
    small, _ = _sizes(tmp_path / "i4")
    big, _ = _sizes(tmp_path / "i8")
    target = (small + big) / 2
    assert main([base[0], base[1], str(tmp_path / "t"), *base[2:], "--format", "int4",
                 "--target-size", str(target / 1e9), "--measurement", str(meas)]) == 0
    total, mix = _sizes(tmp_path / "t")
    assert small < total <= target
    assert mix.get("int4", 0) > 0 and mix.get("int8", 0) + mix.get("bf16", 0) > 0
    m = read_manifest(tmp_path / "t")
    assert m.quant.target_size_gb == pytest.approx(target / 1e9) and m.quant.measurement_sha256


def test_target_too_small_is_one_clear_error(setup, tmp_path, capsys):
    ck, meas = setup
    code = main(["quantize", str(ck), str(tmp_path / "t"), "--format", "int4", "--components", "dit",
                 "--target-size", "0.0001", "--measurement", str(meas)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "GB" in err[0]
    assert not (tmp_path / "t").exists()


def test_target_needs_measurement(setup, tmp_path, capsys):
    ck, _ = setup
    assert main(["quantize", str(ck), str(tmp_path / "t"), "--format", "int4", "--target-size", "1"]) != 0
    assert "--measurement" in capsys.readouterr().err
