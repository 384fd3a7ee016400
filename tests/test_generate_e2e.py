"""End to end on CPU: tiny checkpoint -> quantize -> generate 3 clips -> mp4; kill -9 + --resume; bad artifacts.

The renders run as `liveavatar-lite` subprocesses with OMP_NUM_THREADS=1, exactly as a user runs
them, so the uninterrupted and the resumed render see identical thread counts (bit-identical math).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")
pytest.importorskip("onnxruntime")

from media_fixtures import decoded_frames  # noqa: E402
from render_helpers import SIZE, cli_command, generate_args, render_env  # noqa: E402

from liveavatar_lite.cli import main as cli_main  # noqa: E402
from liveavatar_lite.pipeline.workdir import RenderWorkDir  # noqa: E402


def test_end_to_end_three_clips_h264_25fps_with_aac(clean_render: dict, media: Path) -> None:
    out = clean_render["out"]
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.average_rate == 25
        assert (v.codec_context.width, v.codec_context.height) == (64, 64)
        assert v.frames == 45 + 48 + 48
        assert a.codec_context.name == "aac"
        video_s, audio_s = float(v.duration * v.time_base), float(a.duration * a.time_base)
    assert abs(video_s - 141 / 25) < 1e-6
    assert abs(audio_s - video_s) <= 1 / 25
    frames = decoded_frames(out)
    assert frames.shape == (141, 64, 64, 3) and frames.std() > 1  # decoded pixels, not a blank video
    records = [json.loads(line) for line in clean_render["telemetry"].read_text().splitlines()]
    assert [r["frames"] for r in records if r["event"] == "clip"] == [45, 48, 48]
    assert records[-1]["event"] == "summary" and records[-1]["frames"] == 141
    assert all(r["host_rss_bytes"] > 0 and r["seconds"] > 0 for r in records if r["event"] == "clip")
    assert not RenderWorkDir.path_for(out).exists()
    assert len(list((media / "cache" / "prompts").glob("*.safetensors"))) == 1  # prompt cached
    print(f"\nend-to-end render of 3 clips (tiny model, {SIZE}, CPU): {clean_render['wall']:.1f} s wall")


def test_kill_9_then_resume_gives_identical_frames(clean_render: dict, tiny_artifact: Path, media: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "resumed.mp4"
    journal = RenderWorkDir.path_for(out) / "journal.json"
    proc = subprocess.Popen(cli_command(*generate_args(tiny_artifact, media, out)), env=render_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["segments"]) >= 1:
                break  # clip 0 is durable; the process is now inside clip 1
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    time.sleep(0.05)  # land inside clip 1 (a tiny clip takes seconds on CPU)
    assert proc.poll() is None, "the render finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing that looks finished
    assert len(json.loads(journal.read_text())["segments"]) in (1, 2)
    resumed = subprocess.run(cli_command(*generate_args(tiny_artifact, media, out, "--resume")), env=render_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after" in resumed.stderr
    assert np.array_equal(decoded_frames(out), decoded_frames(clean_render["out"]))


@pytest.mark.gpu
def test_gpu_render_reports_vram_and_copy_wait(clean_render: dict) -> None:
    records = [json.loads(line) for line in clean_render["telemetry"].read_text().splitlines()]
    clips = [r for r in records if r["event"] == "clip"]
    assert all(r["peak_vram_bytes"] and r["peak_vram_bytes"] > 0 for r in clips)
    assert all(r["copy_wait_fraction"] is not None and 0 <= r["copy_wait_fraction"] <= 1 for r in clips)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main(args)
    return rc, capsys.readouterr().err


def _edited_copy(artifact: Path, dest: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of `artifact` at `dest` whose manifest `edit` changed in place."""
    shutil.copytree(artifact, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_artifact_of_another_format_version_is_refused(tiny_artifact: Path, media: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    art = _edited_copy(tiny_artifact, tmp_path / "art", lambda m: m.update(format_version=99))
    rc, err = _run_cli(generate_args(art, media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "unknown format version 99" in err and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists()


def test_artifact_of_another_model_is_refused(tiny_artifact: Path, media: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    art = _edited_copy(tiny_artifact, tmp_path / "art",
                       lambda m: m["dit"].update(num_layers=3, audio_inject_layers=[0, 2]))
    rc, err = _run_cli(generate_args(art, media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "not a model this runtime knows" in err and err.count("\n") == 1


def test_missing_artifact_and_not_an_artifact(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_cli(generate_args(tmp_path / "nope", media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "manifest.json" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    rc, err = _run_cli(generate_args(tmp_path / "junk", media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "corrupt" in err


def test_budget_too_small_names_the_plan_suggestion(tiny_artifact: Path, media: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_cli(generate_args(tiny_artifact, media, tmp_path / "o.mp4", "--vram", "0.001"), capsys)
    assert rc == 3 and "do not fit" in err and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.mp4.tmp").exists()


@pytest.mark.parametrize("kind", ["silent", "corrupt-image", "bad-size"])
def test_bad_media_through_the_cli(tiny_artifact: Path, media: Path, tmp_path: Path, kind: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "media"
    shutil.copytree(media, local, ignore=shutil.ignore_patterns("cache"))
    extra: list[str] = []
    if kind == "silent":
        sf.write(str(local / "speech.wav"), np.zeros((16000, 1), np.float32), 16000)
    elif kind == "corrupt-image":
        (local / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    else:
        extra = ["--size", "10*10"]
    args = generate_args(tiny_artifact, local, tmp_path / "o.mp4")
    if extra:
        args[args.index("--size") + 1] = extra[1]
    rc, err = _run_cli(args, capsys)
    assert rc == 2 and err.startswith("liveavatar-lite generate: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists()
