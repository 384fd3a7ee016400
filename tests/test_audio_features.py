"""Audio features: upstream parity (golden), the 50->30->25 fps frame mapping, chunking, fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny_components import write_tiny_wav2vec

from liveavatar_lite.conditioning.audio_features import (
    AudioChunking,
    Wav2VecEncoder,
    _chunk_plan,
    _video_frame_taps,
    extract_audio_features,
    load_wav2vec,
    num_clips_for_audio,
    resampled_frame_count,
    wav2vec_frame_count,
)
from liveavatar_lite.config import PRESETS
from liveavatar_lite.errors import CheckpointError, UserError

GOLDEN = Path(__file__).parent / "golden" / "cond"


@pytest.fixture(scope="module")
def golden() -> tuple[Wav2VecEncoder, np.ndarray, torch.Tensor, int]:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    with safe_open(str(GOLDEN / "audio.safetensors"), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**json.loads(meta["config"]))).eval()
    model.load_state_dict({k[len("weight."):]: v.float() for k, v in t.items() if k.startswith("weight.")})
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    wave = t["pcm"].numpy().astype(np.float32) / 32768
    return Wav2VecEncoder(model, extractor), wave, t["features"], int(meta["num_clips"])


def test_matches_upstream_golden(golden) -> None:
    enc, wave, ref, nr = golden
    got = extract_audio_features(enc, wave)
    assert got.shape == ref.shape == (3, 8, nr * 48)
    assert (got - ref).abs().max() < 1e-4  # measured 1.2e-7
    assert num_clips_for_audio(len(wave)) == nr


def test_chunked_is_close_and_exact_where_local(golden) -> None:
    enc, wave, _, _ = golden
    whole = extract_audio_features(enc, wave)
    plan = _chunk_plan(wav2vec_frame_count(len(wave)), AudioChunking(chunk_seconds=0.5, context_seconds=0.3))
    assert len(plan) > 2
    chunked = extract_audio_features(enc, wave, chunking=AudioChunking(chunk_seconds=0.5, context_seconds=0.3))
    # hidden state 0 (conv front-end + conv position embedding) only sees +-8 frames here: exact
    assert (chunked[0] - whole[0]).abs().max() < 1e-5
    # transformer layers attend globally, so a window changes them a little (documented)
    assert (chunked - whole).abs().max() < 0.05 * whole.abs().max()


def test_chunk_plan_tiles_frames() -> None:
    for frames in (1, 10, 1500, 2000, 2001, 31234):
        plan = _chunk_plan(frames, AudioChunking(chunk_seconds=30, context_seconds=5))
        cores = [(a, b) for _, _, a, b in plan]
        assert cores[0][0] == 0 and cores[-1][1] == frames
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(cores, cores[1:]))
        for w0, w1, a, b in plan:
            assert w0 <= a < b <= w1 <= frames and (w1 > b or b == frames)
    assert len(_chunk_plan(2000, AudioChunking(30, 5))) == 1  # <= 40 s: one pass, exactly upstream


def _upstream_style_frames(h50: torch.Tensor, clip_frames: int = 48, fps: int = 25) -> torch.Tensor:
    """Independent re-statement of upstream: F.interpolate 50->30 then per-frame bucket (m=0)."""
    t50 = h50.shape[1]
    t30 = int(t50 / 50.0 * 30)
    h30 = F.interpolate(h50.transpose(1, 2), size=t30, mode="linear", align_corners=True).transpose(1, 2)
    nr = int(t30 / (clip_frames * (30 / fps))) + 1
    n = nr * clip_frames
    total = int(np.ceil(nr * clip_frames / fps * 30))
    idx = np.clip(np.round(np.linspace(0, n / fps, n, endpoint=False) * 30).astype(int), 0, total - 1)
    out = torch.zeros(h50.shape[0], h50.shape[2], n)
    for j, i in enumerate(idx):
        if i < t30:
            out[:, :, j] = h30[:, i]
    return out


@pytest.mark.parametrize("t50", [2, 3, 7, 49, 96, 97, 150, 499, 1234])
def test_frame_taps_equal_interpolate_then_bucket(t50: int) -> None:
    g = torch.Generator().manual_seed(t50)
    h50 = torch.randn(3, t50, 5, generator=g)
    ref = _upstream_style_frames(h50)
    t30 = resampled_frame_count(t50)
    n_clips = ref.shape[-1] // 48
    taps = _video_frame_taps(t50, n_clips, 48, 25)
    lo, hi, lam = torch.from_numpy(taps.lo), torch.from_numpy(taps.hi), torch.from_numpy(taps.lam)
    got = h50[:, lo] * (1 - lam)[None, :, None] + h50[:, hi] * lam[None, :, None]  # [3, n, 5]
    got = got.transpose(1, 2) * torch.from_numpy(taps.valid).float()
    assert t30 >= 1
    assert (got - ref).abs().max() < 1e-6


def test_num_clips_examples() -> None:
    assert wav2vec_frame_count(16000) == 49  # hop 320, receptive field 400
    assert num_clips_for_audio(10 * 16000) == 6  # T30 = int(499 / 50 * 30) = 299; int(299 / 57.6) + 1
    assert num_clips_for_audio(1600) == 1
    assert num_clips_for_audio(600 * 16000) == 313


def test_too_short_audio_is_a_user_error(golden) -> None:
    enc, _, _, _ = golden
    with pytest.raises(UserError, match="too short"):
        extract_audio_features(enc, np.full(500, 0.1, dtype=np.float32))


def test_write_tiny_wav2vec_loads(tmp_path: Path) -> None:
    cfg = PRESETS["tiny"].wav2vec
    d = write_tiny_wav2vec(tmp_path / "w2v", cfg, seed=3)
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "preprocessor_config.json", "model.safetensors", "vocab.json"} <= names
    enc = load_wav2vec(d)
    c = enc.model.config
    assert (c.feat_extract_norm, c.do_stable_layer_norm) == ("layer", True)
    assert int(np.prod(c.conv_stride)) == 320 and c.hidden_size == cfg.hidden_size
    wave = np.sin(np.arange(16000) * 0.05).astype(np.float32)
    feats = extract_audio_features(enc, wave)
    assert feats.shape == (cfg.num_hidden_layers + 1, cfg.hidden_size, 48)
    assert torch.isfinite(feats).all()
    # the same seed writes the same weights
    d2 = write_tiny_wav2vec(tmp_path / "w2v2", cfg, seed=3)
    assert (d / "model.safetensors").read_bytes() == (d2 / "model.safetensors").read_bytes()


def test_load_wav2vec_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_wav2vec(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot load wav2vec2"):
        load_wav2vec(tmp_path / "empty")
