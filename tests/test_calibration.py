"""Calibration: described inputs, one-unit-at-a-time measurement, measurement.json, --target-size selection."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from liveavatar_lite.cli import main as cli_main
from calibration.inputs import default_samples
from calibration.measure import measure
from calibration.measurement import read_measurement, write_measurement
from calibration.select import pick_formats
from liveavatar_lite.artifact.checkpoint import CheckpointDir, LoraWeights
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import preset_for_dit
from liveavatar_lite.errors import UserError

FORMATS = [QuantType.INT8, QuantType.FP8, QuantType.INT4, QuantType.NF4]


def test_samples_are_deterministic_and_plausible():
    a, b = default_samples(2, 1.0, 32, 48), default_samples(2, 1.0, 32, 48)
    assert [s.prompt for s in a] == [s.prompt for s in b] and a[0].prompt != a[1].prompt
    assert all(np.array_equal(x.wave, y.wave) and torch.equal(x.image, y.image) for x, y in zip(a, b))
    s = a[0]
    assert s.wave.dtype == np.float32 and len(s.wave) == 16000 and 0.4 < np.abs(s.wave).max() <= 0.5
    spectrum = np.abs(np.fft.rfft(s.wave))
    voiced = spectrum[300:3500].sum() / spectrum.sum()  # bins are 1 Hz: energy sits in the speech band
    assert voiced > 0.6
    assert s.image.shape == (3, 32, 48) and s.image.min() >= -1 and s.image.max() <= 1


@pytest.fixture(scope="module")
def measured(tiny_ckpt):
    ck = CheckpointDir(tiny_ckpt)
    lora = LoraWeights.open(tiny_ckpt / "liveavatar.safetensors")
    samples = default_samples(1, 2.0, 64, 64)
    return ck, measure(ck, preset_for_dit(ck.dit_config), lora, FORMATS, samples, group_size=64, progress=False)


def test_measurement_covers_unit_linears_with_sane_errors(measured):
    ck, m = measured
    cfg = ck.dit_config
    n_linears = cfg.num_layers * 10 + len(cfg.audio_inject_layers) * 5  # q,k,v,o x2 + ffn.0/2; injector q,k,v,o + adain
    assert len(m.layers) == n_linears
    for key, layer in m.layers.items():
        e = {q: layer.formats[q].rel_mse for q in FORMATS}
        assert layer.formats[QuantType.BF16].rel_mse == 0.0 and layer.rows > 0
        assert e[QuantType.INT8] < e[QuantType.FP8] < e[QuantType.INT4], key
        assert 30 < layer.formats[QuantType.INT8].snr_db < 60, key
        assert layer.formats[QuantType.INT4].bytes < layer.formats[QuantType.INT8].bytes < layer.formats[QuantType.BF16].bytes


def test_measurement_roundtrip_and_version(measured, tmp_path):
    _, m = measured
    p = tmp_path / "m.json"
    write_measurement(p, m)
    assert read_measurement(p).layers == m.layers
    doc = json.loads(p.read_text())
    doc["version"] = 99
    p.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="not supported"):
        read_measurement(p)


def test_select_spends_budget_on_the_most_sensitive_layers(measured):
    _, m = measured
    smallest = sum(min(f.bytes for f in layer.formats.values()) for layer in m.layers.values())
    largest = sum(max(f.bytes for f in layer.formats.values()) for layer in m.layers.values())
    for budget in (smallest, (smallest + largest) // 2, largest):
        choice = pick_formats(m, budget)
        assert sum(m.layers[k].formats[q].bytes for k, q in choice.items()) <= budget
    assert set(pick_formats(m, largest).values()) == {QuantType.BF16}
    with pytest.raises(UserError, match="at least"):
        pick_formats(m, smallest - 1)


def test_calibrate_cli_on_dit_only_checkpoint(tmp_path, capsys):
    from quantize_fixtures import write_dit_checkpoint

    ck = write_dit_checkpoint(tmp_path / "ck")  # no encoders: Gaussian conditioning stands in
    out = tmp_path / "m.json"
    assert cli_main(["calibrate", str(ck), "--out", str(out), "--samples", "1", "--height", "64", "--width", "64",
                           "--formats", "int8,int4", "--seconds", "1"]) == 0
    m = read_measurement(out)
    assert {q for layer in m.layers.values() for q in layer.formats} == {QuantType.BF16, QuantType.INT8, QuantType.INT4}
    assert cli_main(["calibrate", str(ck), "--out", str(out)]) != 0  # exists without --force
