"""video.py: per-clip h264 segments, crash-safe work dir, atomic mux with aac of matching length."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from media_fixtures import decoded_frames, write_speech  # noqa: E402

from liveavatar_lite.decode.video import (  # noqa: E402
    AAC_RATE,
    VideoSpec,
    h264_encoder_name,
    mux_segments,
)
from liveavatar_lite.errors import UserError  # noqa: E402
from liveavatar_lite.pipeline.workdir import RenderWorkDir  # noqa: E402

SPEC = VideoSpec(height=64, width=96, preset="ultrafast")


def _frames(n: int, seed: int) -> np.ndarray:
    """Smooth frames (compress well, decode close to the input): uint8 [n, H, W, 3]."""
    y, x = np.mgrid[0:SPEC.height, 0:SPEC.width]
    out = np.empty((n, SPEC.height, SPEC.width, 3), np.uint8)
    for i in range(n):
        for c in range(3):
            out[i, :, :, c] = (x * (c + 1) + y * 2 + 7 * i + 40 * seed) % 200 + 20
    return out


def _render(tmp_path: Path, counts: list[int], key: str = "job") -> RenderWorkDir:
    work = RenderWorkDir.open(tmp_path / "out.mp4", key, resume=False)
    for k, n in enumerate(counts):
        seg = work.begin_clip(k, SPEC)
        seg.append(_frames(n - n // 2, k))
        seg.append(_frames(n // 2, k + 10))
        work.commit_clip(seg, lambda f, k=k: f.write(f"state{k}".encode()))  # f: the open state file
    return work


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        info = {
            "vcodec": v.codec_context.name, "fps": v.average_rate, "frames": v.frames,
            "vdur": float(v.duration * v.time_base), "acodec": a.codec_context.name,
            "adur": float(a.duration * a.time_base), "rate": a.rate,
        }
    with av.open(str(path)) as c:
        info["decoded"] = sum(1 for _ in c.decode(video=0))
    return info


def test_libx264_and_aac_available() -> None:
    assert h264_encoder_name() == "libx264"
    av.codec.Codec("aac", "w")


def test_segments_mux_to_h264_25fps_with_aac_of_equal_duration(tmp_path: Path) -> None:
    work = _render(tmp_path, [45, 48, 48])
    assert work.clips_done == 3 and work.frames_done == 141
    assert sorted(p.name for p in work.root.iterdir()) == [
        "clip_00000.mp4", "clip_00001.mp4", "clip_00002.mp4", "journal.json", "state_00002.pt"]
    out = tmp_path / "out.mp4"
    assert mux_segments(work.segment_paths(), write_speech(tmp_path / "s.wav", 7.0), out, SPEC) == 141
    info = _probe(out)
    assert info["vcodec"] == "h264" and info["fps"] == 25 and info["frames"] == 141 == info["decoded"]
    assert info["acodec"] == "aac" and info["rate"] == AAC_RATE
    assert abs(info["vdur"] - 141 / 25) < 1e-6
    assert abs(info["adur"] - info["vdur"]) <= 1 / 25  # speech was longer: cut to the video
    assert not (tmp_path / "out.mp4.tmp").exists()


def test_short_mono_speech_is_padded_to_the_video(tmp_path: Path) -> None:
    work = _render(tmp_path, [45, 48])
    out = tmp_path / "out.mp4"
    mux_segments(work.segment_paths(), write_speech(tmp_path / "s.wav", 1.0, rate=16000, channels=1), out, SPEC)
    info = _probe(out)
    assert abs(info["adur"] - 93 / 25) <= 1 / 25


@pytest.mark.parametrize("fmt,rate", [("FLAC", 44100), ("OGG", 48000), ("WAV", 8000)])
def test_speech_in_other_formats_and_rates(tmp_path: Path, fmt: str, rate: int) -> None:
    work = _render(tmp_path, [45])
    t = np.arange(int(2.5 * rate)) / rate
    path = tmp_path / f"s.{fmt.lower()}"
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate, format=fmt)
    out = tmp_path / "out.mp4"
    mux_segments(work.segment_paths(), path, out, SPEC)
    info = _probe(out)
    assert info["acodec"] == "aac" and abs(info["adur"] - 45 / 25) <= 1 / 25


def test_decoded_frames_match_input(tmp_path: Path) -> None:
    work = _render(tmp_path, [45])
    out = tmp_path / "out.mp4"
    mux_segments(work.segment_paths(), write_speech(tmp_path / "s.wav", 2.0), out, SPEC)
    got = decoded_frames(out)
    want = np.concatenate([_frames(23, 0), _frames(22, 10)])
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).mean() < 8  # lossy but close (yuv420 chroma, crf 18)


def test_mux_failure_leaves_no_output(tmp_path: Path) -> None:
    work = _render(tmp_path, [45])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    out = tmp_path / "out.mp4"
    with pytest.raises(UserError, match="cannot read audio"):
        mux_segments(work.segment_paths(), bad, out, SPEC)
    assert not out.exists() and not (tmp_path / "out.mp4.tmp").exists()


def test_resume_keeps_committed_clips_and_drops_partial_files(tmp_path: Path) -> None:
    work = _render(tmp_path, [45, 48])
    (work.root / "clip_00002.mp4.part").write_bytes(b"half")  # what a kill -9 mid-clip leaves
    (work.root / "state_00002.pt.tmp").write_bytes(b"half")
    work.unlock()  # the killed render's lock died with it
    again = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=True)
    assert again.clips_done == 2 and again.frames_done == 93
    assert again.state_path is not None and again.state_path.read_bytes() == b"state1"
    assert sorted(p.name for p in again.root.iterdir()) == [
        "clip_00000.mp4", "clip_00001.mp4", "journal.json", "state_00001.pt"]


def test_sparse_checkpoints_and_rewind(tmp_path: Path) -> None:
    work = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=False)
    for k, with_state in enumerate([True, False, False]):
        seg = work.begin_clip(k, SPEC)
        seg.append(_frames(45 if k == 0 else 48, k))
        work.commit_clip(seg, (lambda f: f.write(b"s0")) if with_state else None)
    assert work.clips_done == 3 and work.state_clips == 1 and work.state_path.name == "state_00000.pt"
    work.unlock()
    again = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=True)
    again.rewind_to_state()
    assert again.clips_done == 1 and again.frames_done == 45
    assert sorted(p.name for p in again.root.iterdir()) == ["clip_00000.mp4", "journal.json", "state_00000.pt"]
    seg = again.begin_clip(1, SPEC)  # continues right after the checkpoint
    seg.abort()


def test_resume_refuses_another_job_and_fresh_start_discards(tmp_path: Path) -> None:
    _render(tmp_path, [45])
    with pytest.raises(UserError, match="other inputs"):
        RenderWorkDir.open(tmp_path / "out.mp4", "other-job", resume=True)
    fresh = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=False)
    assert fresh.clips_done == 0 and fresh.state_path is None
    assert [p.name for p in fresh.root.iterdir()] == ["journal.json"]


def test_resume_with_missing_segment_renders_it_again(tmp_path: Path) -> None:
    work = _render(tmp_path, [45, 48])
    (work.root / "clip_00001.mp4").unlink()  # a missing segment is damage: from it on, rendered again (issue 25)
    work.unlock()
    again = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=True)
    assert again.clips_done < 2 and all(p.is_file() for p in again.segment_paths())


def test_journal_is_written_after_segment_and_state(tmp_path: Path) -> None:
    work = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=False)
    seg = work.begin_clip(0, SPEC)
    seg.append(_frames(45, 0))

    def failing_state(f: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        work.commit_clip(seg, failing_state)
    journal = json.loads((work.root / "journal.json").read_text())
    assert journal["segments"] == [] and journal["state"] is None  # the clip does not count


def test_append_rejects_wrong_frames(tmp_path: Path) -> None:
    work = RenderWorkDir.open(tmp_path / "out.mp4", "job", resume=False)
    seg = work.begin_clip(0, SPEC)
    with pytest.raises(ValueError, match="uint8"):
        seg.append(np.zeros((2, 32, 32, 3), np.uint8))
    seg.abort()
    assert not seg.path.exists()
