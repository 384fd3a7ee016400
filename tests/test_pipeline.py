"""The stay-loaded Pipeline on the tiny artifact: warm renders equal cold `generate` runs, load nothing,
and `stream()` yields exactly the frames `render()` writes; `generate --live` plays while it renders.

The Pipeline runs in a child process with OMP_NUM_THREADS=1, like the CLI renders it is compared to,
so both see identical thread counts (bit-identical math).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("onnxruntime")

from media_fixtures import decoded_frames  # noqa: E402
from render_helpers import PROMPT, SIZE, cli_command, generate_args, render_env  # noqa: E402

from liveavatar_lite.decode.hls import read_playlist  # noqa: E402

TESTS = Path(__file__).resolve().parent

# Two renders on one Pipeline (seed 7: 3 clips, like `clean_render`; seed 8: 1 clip), the loads after
# each, and seed 8 again through stream(): its frames re-encoded exactly as render() encodes them.
_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import numpy as np
from liveavatar_lite import Pipeline
from liveavatar_lite.decode.video import ClipSegmentWriter, VideoSpec

root, media = Path({root!r}), Path({media!r})
pipe = Pipeline.from_artifact({art!r}, cache_dir=media / "cache", size={size!r}, progress=False)
kw = dict(image=media / "photo.png", audio=media / "speech.wav", prompt={prompt!r}, size={size!r},
          checkpoint_interval_s=0)
report = {{"loaded": pipe.loads}}
first = pipe.render(out=root / "a.mp4", seed=7, **kw)
report["after_first"] = pipe.loads
second = pipe.render(out=root / "b.mp4", seed=8, num_clip=1, **kw)
report["after_second"] = pipe.loads
report["ttff"] = [first.first_frame_seconds, second.first_frame_seconds]
report["rtf"] = [first.realtime_factor, second.realtime_factor]
blocks = list(pipe.stream(image=kw["image"], audio=kw["audio"], prompt=kw["prompt"], size=kw["size"], seed=8,
                          num_clip=1))
report["after_stream"] = pipe.loads
report["blocks"] = [(b.clip, b.block, b.first_frame, int(b.frames.shape[0]), len(b.audio), b.audio_start_s,
                     b.audio_end_s) for b in blocks]
frames = np.concatenate([b.frames for b in blocks])
spec = VideoSpec(height=frames.shape[1], width=frames.shape[2])
seg = ClipSegmentWriter(0, root / "s.mp4", root / "s.mp4", spec)  # written in place (no rename)
seg.append(frames)
seg.close()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def warm(tiny_artifact: Path, media: Path, clean_render: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The child's report (after `clean_render`, so the prompt and photo caches are warm)."""
    root = tmp_path_factory.mktemp("pipeline")
    code = _CHILD.format(tests=str(TESTS), root=str(root), media=str(media), art=str(tiny_artifact), size=SIZE,
                         prompt=PROMPT)
    proc = subprocess.run([sys.executable, "-c", code], env=render_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, **json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="module")
def cold_seed8(tiny_artifact: Path, media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`generate --seed 8 --num-clip 1 --live DIR` through the CLI (a cold start)."""
    root = tmp_path_factory.mktemp("cold8")
    out, live = root / "b.mp4", root / "live"
    proc = subprocess.run(cli_command(*generate_args(tiny_artifact, media, out, "--num-clip", "1", "--live", str(live),
                                                     seed=8)),
                          env=render_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "live": live, "stderr": proc.stderr}


def test_warm_renders_equal_cold_generate_runs(warm: dict, clean_render: dict, cold_seed8: dict) -> None:
    a, b = decoded_frames(warm["root"] / "a.mp4"), decoded_frames(warm["root"] / "b.mp4")
    assert a.shape[0] == 141 and b.shape[0] == 45
    assert np.array_equal(a, decoded_frames(clean_render["out"]))  # first render: as a cold 3-clip generate
    assert np.array_equal(b, decoded_frames(cold_seed8["out"]))  # second: nothing of the first leaks in


def test_second_render_loads_nothing(warm: dict) -> None:
    loaded = warm["loaded"]
    assert loaded["dit"] == 1 and loaded["decoder"] == 1 and loaded["audio_encoder"] == 1
    # the prompt and the photo were cached by `clean_render`: neither umT5 nor the VAE encoder loads
    assert warm["after_first"] == loaded and warm["after_second"] == loaded and warm["after_stream"] == loaded


def test_stream_blocks_concatenate_to_the_mp4_frames(warm: dict) -> None:
    blocks = warm["blocks"]
    assert [(c, b) for c, b, *_ in blocks] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [n for *_, n, _, _, _ in blocks] == [9, 12, 12, 12]
    first = 0
    for _, _, start, n, samples, t0, t1 in blocks:
        assert start == first and samples == n * 640 and (t0, t1) == (first / 25, (first + n) / 25)
        first += n
    # the streamed frames, encoded as render() encodes them, decode to the mp4's frames exactly
    assert np.array_equal(decoded_frames(warm["root"] / "s.mp4"), decoded_frames(warm["root"] / "b.mp4"))


def test_first_frame_and_realtime_factor_are_reported(warm: dict, cold_seed8: dict) -> None:
    assert all(t is not None and t > 0 for t in warm["ttff"]) and all(r and r > 0 for r in warm["rtf"])
    assert "first frame after" in cold_seed8["stderr"] and "real-time factor" in cold_seed8["stderr"]


def test_live_playlist_of_a_real_render(cold_seed8: dict) -> None:
    entries, ended = read_playlist(cold_seed8["live"] / "index.m3u8")
    assert ended and [name for name, _ in entries] == ["seg_00000.ts"] and entries[0][1] == pytest.approx(45 / 25)
    with av.open(str(cold_seed8["live"] / "seg_00000.ts")) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}
        live = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(live, decoded_frames(cold_seed8["out"]))  # the same h264 packets as the mp4
