"""generate.py orchestration against a small fake renderer: sizes, clip counts, bad input, kill -9 + resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from media_fixtures import decoded_frames, write_photo, write_speech  # noqa: E402

from liveavatar_lite.conditioning.photo import load_reference, parse_size  # noqa: E402
from liveavatar_lite.errors import BudgetError, UserError  # noqa: E402
from liveavatar_lite.pipeline.generate import num_clips_for  # noqa: E402
from liveavatar_lite.pipeline.pipeline import generate  # noqa: E402
from liveavatar_lite.pipeline.request import RenderInputs, RenderRequest  # noqa: E402
from liveavatar_lite.pipeline.workdir import RenderWorkDir  # noqa: E402

TESTS = Path(__file__).resolve().parent


class FakeRenderer:
    """Frames that depend on every block rendered before (like KV caches do), so a wrong resume shows."""

    blocks_per_clip = 4

    def __init__(self, inputs: RenderInputs, delay: float = 0.0) -> None:
        self.height, self.width, self.seed, self.delay = inputs.height, inputs.width, inputs.request.seed, delay
        self.history = torch.tensor(float(inputs.reference.mean()), dtype=torch.float64)
        self.blocks = 0

    def block_frames(self, clip: int, block: int) -> np.ndarray:
        assert clip * self.blocks_per_clip + block == self.blocks, "renderer asked for a block out of order"
        time.sleep(self.delay)
        rng = np.random.default_rng([self.seed, self.blocks])
        self.history = self.history * 0.5 + float(rng.uniform(0, 100))
        base = int(self.history.item()) % 150 + 30
        y, x = np.mgrid[0:self.height, 0:self.width]
        frames = np.empty((12, self.height, self.width, 3), np.uint8)
        for i in range(12):
            frames[i] = ((x + y + 3 * i) % 40 + base)[..., None]  # [H, W, 1] broadcast over RGB
        self.blocks += 1
        return frames

    def state(self) -> dict[str, Any]:
        return {"history": self.history.clone(), "blocks": torch.tensor(self.blocks)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.history, self.blocks = state["history"], int(state["blocks"])

    def copy_wait_seconds(self) -> float:
        return 0.25 * self.blocks * self.delay


class FailingRenderer(FakeRenderer):
    """A FakeRenderer that raises `error` when asked for block `fail_at` = (clip, block)."""

    def __init__(self, inputs: RenderInputs, fail_at: tuple[int, int], error: BaseException) -> None:
        super().__init__(inputs)
        self.fail_at, self.error = fail_at, error

    def block_frames(self, clip: int, block: int) -> np.ndarray:
        if (clip, block) == self.fail_at:
            raise self.error
        return super().block_frames(clip, block)


class FakeBackend:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def identity(self) -> str:
        return "fake-artifact"

    def build(self, inputs: RenderInputs) -> FakeRenderer:
        return FakeRenderer(inputs, self.delay)


class FailingBackend(FakeBackend):
    """Renderers that fail at (clip, block) with `error`, like a crash or an OOM mid-render."""

    def __init__(self, clip: int, block: int, error: BaseException) -> None:
        super().__init__()
        self.fail_at, self.error = (clip, block), error

    def build(self, inputs: RenderInputs) -> FakeRenderer:
        return FailingRenderer(inputs, self.fail_at, self.error)


def request_for(tmp_path: Path, **kw: Any) -> RenderRequest:
    base = dict(image=tmp_path / "photo.png", audio=tmp_path / "speech.wav", prompt="a person talking",
                out=tmp_path / "out.mp4", size="128*128", progress=False, checkpoint_interval_s=0.0)
    base.update(kw)
    return RenderRequest(**base)


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    write_photo(tmp_path / "photo.png")
    write_speech(tmp_path / "speech.wav", 4.7)  # int(4.7*30/57.6)+1 = 3 clips
    return tmp_path


# ------------------------------------------------------------------------------------------ pure parts

@pytest.mark.parametrize("size,area", [("704*384", 704 * 384), ("720*400", 288000), ("128*128", 16384),
                                       ("384x256", 98304)])
def test_parse_size(size: str, area: int) -> None:
    assert parse_size(size) == area


@pytest.mark.parametrize("size", ["abc", "704", "0*384", "-64*64", "32*32", "1920*1080", "7*7*7"])
def test_parse_size_rejects(size: str) -> None:
    with pytest.raises(UserError, match="--size"):
        parse_size(size)


@pytest.mark.parametrize("hw,size,want", [
    ((400, 720), "720*400", (384, 704)),  # LIVEAVATAR.md §1.2 examples
    ((400, 720), "688*368", (384, 640)),
    ((720, 400), "704*384", (704, 384)),
    ((1000, 1000), "704*384", (512, 512)),
    ((120, 160), "128*128", (128, 128)),  # a custom size for the tiny model
])
@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_reference_is_sized_as_upstream(tmp_path: Path, hw: tuple[int, int], size: str, want: tuple[int, int],
                                        ext: str) -> None:
    photo = write_photo(tmp_path / f"p.{ext}", width=hw[1], height=hw[0])
    ref = load_reference(photo, size)
    assert ref.shape == (3, *want) and ref.dtype == np.float32
    assert -1.0 <= ref.min() and ref.max() <= 1.0


def test_extreme_aspect_is_refused(tmp_path: Path) -> None:
    photo = write_photo(tmp_path / "p.png", width=4000, height=8)
    with pytest.raises(UserError, match="aspect ratio"):
        load_reference(photo, "128*128")


def test_num_clips_follows_upstream() -> None:
    assert [num_clips_for(int(x * 16000), None) for x in (0.5, 2.0, 3.0, 4.7)] == [1, 2, 2, 3]
    assert num_clips_for(100 * 16000, 3) == 3


# ------------------------------------------------------------------------------------------ rendering

def test_generate_writes_45_48_48_frames_with_audio(inputs: Path) -> None:
    tel = inputs / "tel.jsonl"
    result = generate(request_for(inputs, telemetry=tel), backend=FakeBackend())
    assert (result.clips, result.frames, result.height, result.width) == (3, 141, 128, 128)
    with av.open(str(result.out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.average_rate == 25 and v.frames == 141
        assert a.codec_context.name == "aac"
        assert abs(float(a.duration * a.time_base) - 141 / 25) <= 1 / 25
    assert not RenderWorkDir.path_for(result.out).exists()  # work dir removed once the mp4 exists
    lines = [json.loads(line) for line in tel.read_text().splitlines()]
    assert [r["frames"] for r in lines if r["event"] == "clip"] == [45, 48, 48]
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["frames"] == 141 and summary["clips"] == 3
    clips = [r for r in lines if r["event"] == "clip"]
    for key in ("seconds", "peak_vram_bytes", "host_rss_bytes", "copy_wait_fraction"):
        assert key in clips[0]
    assert [r["event"] for r in lines[:2]] == ["first_frame", "clip"]  # the first frame comes within clip 0
    assert summary["first_frame_seconds"] > 0 and summary["realtime_factor"] > 0


def test_num_clip_caps_the_render(inputs: Path) -> None:
    result = generate(request_for(inputs, num_clip=1), backend=FakeBackend())
    assert (result.clips, result.frames) == (1, 45)


@pytest.mark.parametrize("kind", ["corrupt-image", "missing-image", "bad-size", "tiny-size", "silent-audio",
                                  "empty-audio", "not-audio", "missing-audio", "not-mp4"])
def test_bad_input_fails_cleanly(inputs: Path, kind: str) -> None:
    kw: dict[str, Any] = {}
    if kind == "corrupt-image":
        (inputs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif kind == "missing-image":
        kw["image"] = inputs / "nope.jpg"
    elif kind == "bad-size":
        kw["size"] = "big*small"
    elif kind == "tiny-size":
        kw["size"] = "16*16"
    elif kind == "silent-audio":
        write_speech(inputs / "speech.wav", 2.0, amp=0.0)
    elif kind == "empty-audio":
        sf.write(str(inputs / "speech.wav"), np.zeros((0, 1)), 16000)
    elif kind == "not-audio":
        (inputs / "speech.wav").write_bytes(b"RIFF????WAVEfmt nonsense")
    elif kind == "missing-audio":
        kw["audio"] = inputs / "nope.wav"
    elif kind == "not-mp4":
        kw["out"] = inputs / "out.avi"
    with pytest.raises(UserError) as err:
        generate(request_for(inputs, **kw), backend=FakeBackend())
    assert "\n" not in str(err.value)
    assert not (inputs / "out.mp4").exists() and not (inputs / "out.mp4.tmp").exists()


def test_crash_mid_render_leaves_no_finished_looking_file(inputs: Path) -> None:
    with pytest.raises(RuntimeError):
        generate(request_for(inputs), backend=FailingBackend(1, 2, RuntimeError("simulated failure")))
    assert not (inputs / "out.mp4").exists()
    work = RenderWorkDir.path_for(inputs / "out.mp4")
    assert sorted(p.name for p in work.iterdir()) == ["clip_00000.mp4", "journal.json", "state_00000.pt"]
    resumed = generate(request_for(inputs, resume=True), backend=FakeBackend())
    assert resumed.resumed_clips == 1 and resumed.frames == 141
    clean = generate(request_for(inputs, out=inputs / "clean.mp4"), backend=FakeBackend())
    assert np.array_equal(decoded_frames(resumed.out), decoded_frames(clean.out))


def test_out_of_memory_becomes_a_budget_error_and_keeps_progress(inputs: Path) -> None:
    class OomInClip1(FailingBackend):
        def oom_advice(self) -> str:
            return "rerun with --resume --vram 20.4"

    oom = OomInClip1(1, 0, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(BudgetError, match=r"out of memory after 1 finished clips; rerun with --resume --vram 20.4"):
        generate(request_for(inputs), backend=oom)
    assert not (inputs / "out.mp4").exists()
    assert generate(request_for(inputs, resume=True), backend=FakeBackend()).resumed_clips == 1


def test_sparse_checkpoints_resume_from_the_newest_and_rerender_the_rest(inputs: Path) -> None:
    fails_in_clip_2 = FailingBackend(2, 0, RuntimeError("simulated failure"))
    with pytest.raises(RuntimeError):  # no checkpoint is due within an hour: clips 0-1 have none
        generate(request_for(inputs, checkpoint_interval_s=3600), backend=fails_in_clip_2)
    work = RenderWorkDir.path_for(inputs / "out.mp4")
    assert sorted(p.name for p in work.iterdir()) == ["clip_00000.mp4", "clip_00001.mp4", "journal.json"]
    resumed = generate(request_for(inputs, resume=True), backend=FakeBackend())
    assert resumed.resumed_clips == 0  # rewound to the (empty) checkpoint: everything rendered again
    clean = generate(request_for(inputs, out=inputs / "clean.mp4"), backend=FakeBackend())
    assert np.array_equal(decoded_frames(resumed.out), decoded_frames(clean.out))


def test_killed_while_muxing_resumes_without_rendering(inputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import liveavatar_lite.decode.video as video

    class NoBuild(FakeBackend):
        def build(self, inputs: RenderInputs) -> FakeRenderer:
            raise AssertionError("every clip was done; nothing should be rendered again")

    def interrupted_mux(*args: Any, **kw: Any) -> int:
        raise KeyboardInterrupt  # stands in for a kill while muxing

    with monkeypatch.context() as m:
        m.setattr(video, "mux_segments", interrupted_mux)
        with pytest.raises(KeyboardInterrupt):
            generate(request_for(inputs), backend=FakeBackend())
    assert not (inputs / "out.mp4").exists()
    result = generate(request_for(inputs, resume=True), backend=NoBuild())
    assert result.frames == 141 and result.resumed_clips == 3


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_generate import FakeBackend, request_for
from liveavatar_lite.pipeline.pipeline import generate
generate(request_for(Path({root!r}), resume={resume}), backend=FakeBackend(delay=0.05))
"""


def _child(root: Path, resume: bool) -> subprocess.Popen:
    code = _CHILD.format(tests=str(TESTS), root=str(root), resume=resume)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)


@pytest.mark.parametrize("kill_after_clips", [0, 1])
def test_kill_9_then_resume_gives_identical_frames(inputs: Path, kill_after_clips: int) -> None:
    journal = RenderWorkDir.path_for(inputs / "out.mp4") / "journal.json"
    proc = _child(inputs, resume=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # wait until N clips are durable
        try:
            if len(json.loads(journal.read_text())["segments"]) >= kill_after_clips:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    time.sleep(0.07)  # land somewhere inside the next clip
    assert proc.poll() is None, "the render finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (inputs / "out.mp4").exists()
    proc = _child(inputs, resume=True)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    clean = generate(request_for(inputs, out=inputs / "clean.mp4"), backend=FakeBackend())
    resumed = decoded_frames(inputs / "out.mp4")
    assert resumed.shape[0] == 141
    assert np.array_equal(resumed, decoded_frames(clean.out))


# ------------------------------------------------------------------------------------------ live output

def test_live_playlist_plays_before_the_render_ends(inputs: Path) -> None:
    """After the first clip the playlist lists a segment a player can decode, while the render goes on;
    at the end it is complete: durations sum to the frames written, and the frames are the mp4's."""
    import threading

    from liveavatar_lite.decode.hls import read_playlist

    live = inputs / "live"
    request = request_for(inputs, live=live)
    outcome: dict[str, Any] = {}

    def render() -> None:
        try:
            outcome["result"] = generate(request, backend=FakeBackend(delay=0.15))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=render)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (live / "index.m3u8").exists():
        time.sleep(0.02)
    entries, ended = read_playlist(live / "index.m3u8")
    assert thread.is_alive() and not ended and len(entries) >= 1  # watched while it renders
    with av.open(str(live / entries[0][0])) as c:  # a player's first segment: video + audio
        assert {s.type for s in c.streams} == {"video", "audio"}
        assert sum(1 for _ in c.decode(video=0)) == 45
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.live_playlist == live / "index.m3u8"
    entries, ended = read_playlist(live / "index.m3u8")
    assert ended and [n for n, _ in entries] == ["seg_00000.ts", "seg_00001.ts", "seg_00002.ts"]
    assert sum(d for _, d in entries) == pytest.approx(result.frames / 25, abs=1e-3)
    live_frames = []
    for name, _ in entries:
        with av.open(str(live / name)) as c:
            live_frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.array_equal(np.stack(live_frames), decoded_frames(result.out))


def test_live_output_survives_a_resume(inputs: Path) -> None:
    live = inputs / "live"
    with pytest.raises(RuntimeError):
        generate(request_for(inputs, live=live), backend=FailingBackend(1, 2, RuntimeError("simulated failure")))
    from liveavatar_lite.decode.hls import read_playlist

    assert [n for n, _ in read_playlist(live / "index.m3u8")[0]] == ["seg_00000.ts"]
    resumed = generate(request_for(inputs, live=live, resume=True), backend=FakeBackend())
    entries, ended = read_playlist(live / "index.m3u8")
    assert ended and len(entries) == 3 and sum(d for _, d in entries) == pytest.approx(resumed.frames / 25, abs=1e-3)


def test_live_into_a_file_is_refused(inputs: Path) -> None:
    (inputs / "live").write_text("not a directory")
    with pytest.raises(UserError, match="--live"):
        generate(request_for(inputs, live=inputs / "live"), backend=FakeBackend())
