"""The pieces a talk session computes its audio from: the streaming resampler, the streaming features'
dependence on the speech so far only, and the bound on their timing against the whole-file features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar_lite.conditioning.audio_features import _video_frame_taps, load_wav2vec, resampled_frame_count
from liveavatar_lite.conditioning.speech import StreamResampler, resample
from liveavatar_lite.conditioning.streaming_features import (
    StreamingWindow,
    _nominal_taps,
    samples_needed,
    streaming_block_features,
    utterance_frames,
)
from liveavatar_lite.config import PRESETS


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000, 16000])
@pytest.mark.parametrize("piece", [1, 441, 4410, 10**6])
def test_stream_resampler_equals_one_resample(rate: int, piece: int) -> None:
    seconds = 0.05 if piece == 1 else 1.0  # (one sample at a time: a short signal keeps it quick)
    x = (np.random.default_rng(rate).standard_normal(int(rate * seconds)) * 0.2).astype(np.float32)
    rs = StreamResampler(rate)
    y = np.concatenate([rs.push(x[i:i + piece]) for i in range(0, len(x), piece)] + [rs.flush()])
    ref = resample(x, rate)
    assert len(y) == len(ref)
    # each output sample is the same 64-zero-crossing dot product, summed in another order at most:
    # float32 rounding of ~|x| sqrt(taps) eps ~ 1e-7 (measured 2.4e-7 at worst)
    assert np.abs(y - ref).max() < 2e-6


def test_stream_resampler_gives_output_as_input_arrives() -> None:
    rs = StreamResampler(48000)
    got = sum(len(rs.push(np.zeros(4800, np.float32))) for _ in range(10))  # 1 s in 100 ms pieces
    # all but the kernel's right half-window (64 zero crossings at the 16 kHz cut-off: ~4 ms) is out
    assert 16000 - 100 <= got < 16000


def test_nominal_timing_is_within_7_3_frames_of_the_whole_files() -> None:
    """The streaming re-timing (i30 * 5/3) against the batch path's (i30 * (T50-1)/(T30-1)), for
    every file length up to 2 minutes: |shift| <= (T50 - 5/3 T30) + 2/3 <= 7/3 wav2vec2 frames."""
    worst = 0.0
    for frames_50 in range(3, 6000, 7):
        t30 = resampled_frame_count(frames_50)
        n = (t30 * 25) // 30  # the valid video frames
        if t30 < 2 or n < 1:
            continue
        taps = _video_frame_taps(frames_50, (n // 48) + 1, 48, 25)
        lo, _, lam = _nominal_taps(0, n, 25)
        exact = taps.lo[:n] + taps.lam[:n].astype(np.float64)
        nominal = lo + lam.astype(np.float64)
        worst = max(worst, float(np.abs(exact - nominal)[taps.valid[:n]].max()))
    assert worst <= 7 / 3 + 1e-4


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    from tiny_components import write_tiny_wav2vec

    return load_wav2vec(write_tiny_wav2vec(tmp_path_factory.mktemp("w2v") / "w2v", PRESETS["tiny"].wav2vec))


def test_streaming_features_see_the_speech_up_to_the_lookahead_only(encoder) -> None:
    wave = (np.random.default_rng(1).standard_normal(3 * 16000) * 0.1).astype(np.float32)
    w = StreamingWindow(lookahead_s=0.3, context_s=1.0)
    for k in range(3):
        need = samples_needed(12 * k + 12, w)
        assert need == round((12 * k + 12) * 640 + 0.3 * 16000)
        a = streaming_block_features(encoder, wave, 12 * k, 12 * k + 12, w)
        b = streaming_block_features(encoder, wave[:need].copy(), 12 * k, 12 * k + 12, w)
        assert a.shape == (25, PRESETS["tiny"].wav2vec.hidden_size, 12) and torch.equal(a, b)
        with pytest.raises(ValueError):
            streaming_block_features(encoder, wave[:need - 1], 12 * k, 12 * k + 12, w)


def test_streaming_window_bounds() -> None:
    with pytest.raises(ValueError):
        StreamingWindow(lookahead_s=0.05)
    with pytest.raises(ValueError):
        StreamingWindow(context_s=-1)
    assert utterance_frames(16000) == 48 and utterance_frames(3 * 16000) == 96  # whole clips, as render
