"""The traps a new user falls into (issue 12), each closed: the LoRA default, compressed speech,
features for the clips rendered only, progress bars in log files, self-contradicting GB figures,
a one-sample benchmark.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_fixtures import FAKE_BACKEND_CHILD, assert_one_line, run_cli, use_backend
from media_fixtures import write_photo, write_speech
from quantize_fixtures import write_dit_checkpoint

from liveavatar_lite.artifact.format import read_manifest
from liveavatar_lite.errors import gb_pair

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("private_cache")


# ------------------------------------------------------------------------------------------ the LoRA

def test_quantize_merges_the_lora_beside_the_checkpoint_by_default(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    with_lora = write_dit_checkpoint(tmp_path / "ck")
    assert run_cli(capsys, "quantize", with_lora, tmp_path / "a", "-q", "int8", "--components", "dit",
                   "--no-progress")[0] == 0
    assert read_manifest(tmp_path / "a").source.lora.name == "liveavatar.safetensors"

    bare = write_dit_checkpoint(tmp_path / "bare", with_lora=False)
    code, err = run_cli(capsys, "quantize", bare, tmp_path / "b", "-q", "int8", "--components", "dit", "--no-progress")
    assert_one_line(code, err, "no Live Avatar LoRA", exit_code=2)
    assert "--no-lora" in err and "liveavatar-lite download" in err and not (tmp_path / "b").exists()
    code, err = run_cli(capsys, "quantize", bare, tmp_path / "b", "-q", "int8", "--components", "dit",
                        "--lora", with_lora / "liveavatar.safetensors", "--no-lora")
    assert_one_line(code, err, "contradict", exit_code=2)
    assert run_cli(capsys, "quantize", bare, tmp_path / "b", "-q", "int8", "--components", "dit", "--no-lora",
                   "--no-progress")[0] == 0
    assert read_manifest(tmp_path / "b").source.lora is None


def test_generate_warns_about_an_artifact_without_the_lora(tiny_artifact: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from liveavatar_lite.pipeline.render import ArtifactBackend
    from liveavatar_lite.pipeline.request import PipelineOptions

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["source"]["lora"] = m["source"]["lora_sha256"] = None
    (art / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING):
        ArtifactBackend.open(PipelineOptions(art))
    assert any("without the Live Avatar LoRA" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ArtifactBackend.open(PipelineOptions(tiny_artifact))
    assert not any("LoRA" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ compressed speech

def _encode(wav: Path, out: Path, fmt: str, codec: str, rate: int) -> Path:
    import av
    import soundfile as sf

    data, sr = sf.read(str(wav), dtype="float32", always_2d=True)  # [n, channels]
    with av.open(str(out), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, layout="stereo")
        resampler = av.AudioResampler(format=s.codec_context.format.name, layout="stereo", rate=rate)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T), format="fltp", layout="stereo")
        frame.sample_rate = sr
        for f in resampler.resample(frame) + resampler.resample(None):
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return out


@pytest.mark.parametrize("fmt,codec,rate,suffix", [("ipod", "aac", 44100, "m4a"), ("adts", "aac", 44100, "aac"),
                                                   ("ogg", "libopus", 48000, "opus")])
def test_compressed_speech_decodes_through_pyav_with_our_resampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   fmt: str, codec: str, rate: int,
                                                                   suffix: str) -> None:
    import av

    from liveavatar_lite.conditioning import speech

    wav = write_speech(tmp_path / "s.wav", 3.0, rate=22050)
    comp = _encode(wav, tmp_path / f"s.{suffix}", fmt, codec, rate)
    reference = speech.load_audio(wav)
    calls = []
    real = speech.resample
    monkeypatch.setattr(speech, "resample", lambda w, a, b=16000, **k: calls.append((a, b)) or real(w, a, b, **k))
    monkeypatch.setattr(av, "AudioResampler", None)  # PyAV's resampler is not used on the way in
    wave = speech.load_audio(comp)
    assert calls == [(rate, 16000)]  # one resampler: ours, from the file's own rate
    n = min(len(wave), len(reference))
    assert abs(len(wave) - len(reference)) < 0.05 * len(reference)
    # lossy codec with an encoder delay: compare loudness envelopes (20 ms frames) rather than samples
    env = lambda x: np.sqrt(np.mean(x[: n // 320 * 320].reshape(-1, 320) ** 2, axis=1))  # noqa: E731
    assert np.corrcoef(env(wave), env(reference))[0, 1] > 0.9


def test_generate_muxes_m4a_speech(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    import av
    from test_generate import FakeBackend

    use_backend(monkeypatch, FakeBackend())
    write_photo(tmp_path / "p.png")
    m4a = _encode(write_speech(tmp_path / "s.wav", 2.0), tmp_path / "s.m4a", "ipod", "aac", 44100)
    code, err = run_cli(capsys, "generate", "--artifact", tmp_path, "--image", tmp_path / "p.png", "--audio", m4a,
                        "--prompt", "hi", "--out", tmp_path / "o.mp4", "--size", "64*64", "--no-progress")
    assert code == 0, err
    with av.open(str(tmp_path / "o.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert a.codec_context.name == "aac" and v.frames == 45 + 48
        assert abs(float(a.duration * a.time_base) - v.frames / 25) <= 1 / 25


# ------------------------------------------------------------------------------------------ features per clip

def test_num_clip_limits_the_audio_features_to_the_clips_rendered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiny_components import write_tiny_wav2vec

    import liveavatar_lite.conditioning.audio_features as af
    from liveavatar_lite.config import PRESETS

    enc = af.load_wav2vec(write_tiny_wav2vec(tmp_path / "w2v", PRESETS["tiny"].wav2vec))
    windows: list[tuple[int, int]] = []
    real = af._hidden_states_window
    monkeypatch.setattr(af, "_hidden_states_window",
                        lambda e, v, w0, w1: windows.append((w0, w1)) or real(e, v, w0, w1))
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(20 * 60 * 16000)).astype(np.float32)  # 20 minutes of "speech"
    one = af.extract_audio_features(enc, long, num_clips=1)
    assert one.shape[-1] == 48 and len(windows) == 1  # one wav2vec2 window, not 40
    assert af.num_clips_for_audio(len(long)) == 625

    mid = long[: 75 * 16000]  # 75 s: 3 windows in full; the first 2 clips need the first one only
    windows.clear()
    full = af.extract_audio_features(enc, mid)
    n_full = len(windows)
    windows.clear()
    two = af.extract_audio_features(enc, mid, num_clips=2)
    assert len(windows) < n_full
    assert np.array_equal(two.numpy(), full[..., : 2 * 48].numpy())  # the same numbers, just fewer of them


# ------------------------------------------------------------------------------------------ logs, figures, bench

def test_no_escape_codes_in_logs_that_are_not_a_terminal(tmp_path: Path) -> None:
    write_photo(tmp_path / "p.png")
    write_speech(tmp_path / "s.wav", 2.0)
    argv = ["generate", "--artifact", str(tmp_path), "--image", str(tmp_path / "p.png"), "--audio",
            str(tmp_path / "s.wav"), "--prompt", "hi", "--out", str(tmp_path / "o.mp4"), "--size", "64*64"]
    code = FAKE_BACKEND_CHILD.format(tests=str(TESTS), argv=argv, delay=0.0)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, LIVEAVATAR_LITE_CACHE=str(tmp_path / "c")))
    assert proc.returncode == 0, proc.stderr
    assert "clips" in proc.stderr  # the progress bar is there
    assert "\x1b[" not in proc.stderr  # but no cursor movement from a nested bar


def test_gb_figures_never_contradict_themselves() -> None:
    from calibration.measurement import FormatError, LayerMeasurement, Measurement
    from calibration.select import pick_formats

    from liveavatar_lite.artifact.qtypes import QuantType
    from liveavatar_lite.config import PRESETS
    from liveavatar_lite.errors import UserError

    for need, have in [(2_400_000, 2_100_000), (2_000_400, 2_000_300), (24.04e9, 23.96e9), (1, 0), (2_000_001, 2e6)]:
        n, h = gb_pair(need, have)
        assert float(n.split()[0]) > float(h.split()[0]), (n, h)
    layers = {"blocks.0.ffn.0.weight": LayerMeasurement(
        (16, 16), 8, {QuantType.INT4: FormatError(0.1, 2_000_400), QuantType.BF16: FormatError(0.0, 4_000_000)})}
    m = Measurement(PRESETS["tiny"].dit, {}, 128, ("s",), 1, layers)
    with pytest.raises(UserError) as e:
        pick_formats(m, 2_000_300)
    text = str(e.value)
    assert "0.003 GB" in text and "0.002 GB" in text


def test_bench_stream_reports_the_median_of_several_samples(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up runs are discarded, samples interleave the two layouts, the table shows medians."""
    import bench_stream

    runs: list[int] = []
    times = iter([9.0, 9.0,  # warm-up (resident, streamed): discarded
                  1.0, 2.0, 1.2, 2.2, 50.0, 2.1])  # resident 1.0, 1.2, 50 -> 1.2; streamed 2.0, 2.2, 2.1 -> 2.1

    def fake_measure(cfg, units, plan, size, blocks, device):  # type: ignore[no-untyped-def]
        runs.append(id(plan))
        return {"streamed_units": len(plan.streamed_units), "host_kv": [], "s_per_step": next(times),
                "copy_wait_fraction": 0.0, "h2d_gbps": 0.0, "h2d_gb_per_step": 0.0,
                "predicted_s_per_step": 1.0, "predicted_peak_gb": 1.0}

    monkeypatch.setattr(bench_stream, "measure", fake_measure)
    assert bench_stream.main(["--preset", "tiny", "--layers", "2", "--size", "64*64", "--device", "cpu",
                              "--samples", "3", "--warmup", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(set(runs)) == 2 and runs == runs[:2] * 4  # resident, streamed, resident, ...: interleaved
    assert out["results"]["resident"]["s_per_step"] == 1.2 and out["results"]["streamed"]["s_per_step"] == 2.1
    assert out["streamed_over_resident"] == pytest.approx(2.1 / 1.2)
    assert out["per_sample_ratio_range"] == pytest.approx([2.1 / 50.0, 2.0])
