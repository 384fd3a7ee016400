"""Issue 25 outside the service: the Python API, `--live`, `farm run`'s batch files, `download`,
resume over damaged work, and the traps a new user met. Each case: one clear line (UserError / a
one-line CLI error), in bounded time, nothing finished lost, nothing outside its place touched.
(The service's classes are in test_hardening2_serve.py.)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_fixtures import assert_one_line, run_cli, use_backend, write_media
from media_fixtures import write_speech
from test_generate import FakeBackend, FakeRenderer

from liveavatar_lite.errors import UserError
from liveavatar_lite.pipeline.pipeline import Pipeline
from liveavatar_lite.pipeline.workdir import RenderWorkDir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_media(tmp_path_factory.mktemp("media2"))
    write_speech(root / "tiny.wav", 0.01, rate=16000, channels=1)  # 10 ms
    return root


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    use_backend(monkeypatch, FakeBackend())


def gen(root: Path, media: Path, *extra: str, out: Path | None = None, image: str = "photo.png",
        audio: str = "speech.wav") -> list[str]:
    return ["generate", "--no-progress", "--artifact", str(root / "art"), "--image", str(media / image),
            "--audio", str(media / audio), "--prompt", "a person talking",
            "--out", str(out or root / "out" / "o.mp4"), "--size", "64*64", "--checkpoint-interval", "0", *extra]


def _untouched(root: Path) -> None:
    assert not (root / "out").exists(), sorted(p.name for p in (root / "out").rglob("*"))


# ------------------------------------------------------------------------------------------ class 3 + 4

def _odd_rate_wav(path: Path, rate: int) -> Path:
    import struct

    write_speech(path, 0.5, rate=16000, channels=1)
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))
    return path


SPEECH_BOMBS = {"rate-2^31": 2**31 - 1, "rate-1e6": 1_000_000, "rate-44101": 44101, "rate-3000": 3000}


@pytest.mark.parametrize("name", sorted(SPEECH_BOMBS))
def test_class3_speech_rates_refused_before_decoding(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     media: Path, fake_backend: None, name: str) -> None:
    import resource

    bomb = _odd_rate_wav(tmp_path / f"{name}.wav", SPEECH_BOMBS[name])
    shutil.copy(media / "photo.png", tmp_path / "photo.png")
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    code, err = run_cli(capsys, *gen(tmp_path, bomb.parent, audio=bomb.name))
    assert_one_line(code, err, "Hz", exit_code=2)
    assert time.monotonic() - t0 < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 200_000  # KiB: no GB-sized kernel
    _untouched(tmp_path)


def test_class3_speech_length_from_the_header_and_a_bounded_decode(tmp_path: Path) -> None:
    import soundfile as sf

    from liveavatar_lite.conditioning.speech import SpeechTooLong, load_audio

    sf.write(tmp_path / "hour.flac", np.zeros(4000 * 3600, np.int16), 4000, subtype="PCM_16")
    with pytest.raises(SpeechTooLong, match="3600.0 s long"):
        load_audio(tmp_path / "hour.flac", max_seconds=10)
    write_speech(tmp_path / "twelve.ogg", 12.0)  # ogg: the header states no exact length; the decode stops
    with pytest.raises(SpeechTooLong):
        load_audio(tmp_path / "twelve.ogg", max_seconds=10)
    assert len(load_audio(tmp_path / "twelve.ogg", max_seconds=13)) == pytest.approx(12 * 16000, abs=200)


def _png_claiming(path: Path, w: int, h: int) -> Path:
    from test_hardening2_serve import _png_header_only

    path.write_bytes(_png_header_only(w, h))
    return path


def _eps(path: Path) -> Path:
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n")
    return path


def _pil(path: Path, fmt: str) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, format=fmt)
    return path


PHOTO_CASES = {
    "png-12000": (lambda p: _png_claiming(p, 12000, 12000), "megapixels"),
    "eps": (_eps, "not a photo in a supported format"),
    "tiff": (lambda p: _pil(p, "TIFF"), "not a photo in a supported format"),
    "gif": (lambda p: _pil(p, "GIF"), "not a photo in a supported format"),
}


@pytest.mark.parametrize("name", sorted(PHOTO_CASES))
def test_class3_4_photos_cli_and_pipeline(capsys: pytest.CaptureFixture[str], tmp_path: Path, media: Path,
                                          fake_backend: None, name: str) -> None:
    make, match = PHOTO_CASES[name]
    shutil.copy(media / "speech.wav", tmp_path / "speech.wav")
    make(tmp_path / f"photo.{name}")
    code, err = run_cli(capsys, *gen(tmp_path, tmp_path, image=f"photo.{name}"))  # the CLI
    assert_one_line(code, err, match, exit_code=2)
    _untouched(tmp_path)
    pipe = Pipeline(FakeBackend(), progress=False, size="64*64")  # the Python API
    with pytest.raises(UserError, match=match):
        pipe.render(tmp_path / f"photo.{name}", tmp_path / "speech.wav", "a person", tmp_path / "out" / "o.mp4")
    with pytest.raises(UserError, match=match):
        pipe.stream(tmp_path / f"photo.{name}", tmp_path / "speech.wav", "a person")
    _untouched(tmp_path)


# ------------------------------------------------------------------------------------------ class 5

class GatedBackend(FakeBackend):
    """A FakeBackend whose first build waits until `release` is set (and says when it started)."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def build(self, inputs: Any) -> FakeRenderer:
        self.started.set()
        assert self.release.wait(60)
        return super().build(inputs)


def test_class5_one_render_at_a_time_and_stale_streams(tmp_path: Path, media: Path) -> None:
    backend = GatedBackend()
    pipe = Pipeline(backend, progress=False, size="64*64")
    kw = dict(image=media / "photo.png", audio=media / "speech.wav", prompt="a person talking")
    errors: list[BaseException] = []

    def first() -> None:
        try:
            pipe.render(out=tmp_path / "a.mp4", seed=7, **kw)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    assert backend.started.wait(60)  # the first render holds the models
    with pytest.raises(UserError, match="rendering in another thread"):
        pipe.render(out=tmp_path / "b.mp4", seed=8, **kw)
    with pytest.raises(UserError, match="rendering in another thread"):
        next(iter(pipe.stream(**kw)))
    assert not (tmp_path / "b.mp4").exists() and not RenderWorkDir.path_for(tmp_path / "b.mp4").exists()
    backend.release.set()
    t.join(60)
    assert not errors and (tmp_path / "a.mp4").is_file()
    # the same render alone gives the same file: the refused calls changed nothing
    Pipeline(FakeBackend(), progress=False, size="64*64").render(out=tmp_path / "c.mp4", seed=7, **kw)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "c.mp4").read_bytes()

    stream = pipe.stream(seed=3, **kw)
    first_block = next(stream)
    pipe.render(out=tmp_path / "d.mp4", seed=4, **kw)  # another render while the stream waits
    with pytest.raises(UserError, match="stale"):
        next(stream)
    fresh = list(pipe.stream(seed=3, **kw))  # a new stream is fine, and its first block is the same
    assert np.array_equal(fresh[0].frames, first_block.frames)
    assert (tmp_path / "d.mp4").is_file()


BAD_NUMBERS = [("num_clip", 0), ("num_clip", -1), ("num_clip", 1.5), ("num_clip", True),
               ("seed", 2**64), ("seed", 1.5), ("seed", -1), ("seed", "7")]


@pytest.mark.parametrize("field,value", BAD_NUMBERS, ids=[f"{f}={v!r}" for f, v in BAD_NUMBERS])
def test_class5_bad_numbers_fail_before_any_file(tmp_path: Path, media: Path, field: str, value: Any) -> None:
    pipe = Pipeline(FakeBackend(), progress=False, size="64*64")
    kw = dict(image=media / "photo.png", audio=media / "speech.wav", prompt="a person talking", **{field: value})
    with pytest.raises(UserError, match=field):
        pipe.render(out=tmp_path / "out" / "o.mp4", **kw)
    with pytest.raises(UserError, match=field):
        pipe.stream(**kw)
    _untouched(tmp_path)


@pytest.mark.slow
def test_trap_pipeline_remembers_its_size(tiny_artifact: Path, media: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_artifact(tiny_artifact, cache_dir=tmp_path / "cache", size="64*64", progress=False)
    block = next(iter(pipe.stream(media / "photo.png", media / "speech.wav", "a person talking", num_clip=1)))
    assert block.frames.shape[1:] == (64, 64, 3)  # not 704*384: the size it was loaded for
    assert Pipeline(FakeBackend()).size == "704*384"


# ------------------------------------------------------------------------------------------ class 6

def test_class6_live_dir_mistakes_are_refused_before_the_model(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               media: Path, fake_backend: None) -> None:
    out = tmp_path / "out" / "o.mp4"
    (tmp_path / "afile").write_text("mine")
    cases = {
        "live-is-out": (out, "is the --out file"),
        "under-a-file": (tmp_path / "afile" / "live", "not a directory"),
        "is-a-file": (tmp_path / "afile", "is a file"),
        "inside-the-work-dir": (RenderWorkDir.path_for(out) / "live", "work dir"),
    }
    for name, (live, match) in cases.items():
        code, err = run_cli(capsys, *gen(tmp_path, media, "--live", str(live), out=out))
        assert_one_line(code, err, match, exit_code=2)
        assert not out.parent.exists(), name
    assert (tmp_path / "afile").read_text() == "mine"
    # a user's own segments in the live dir: refused, never deleted
    users = tmp_path / "users-live"
    users.mkdir()
    (users / "seg_00000.ts").write_bytes(b"the user's own segment")
    code, err = run_cli(capsys, *gen(tmp_path, media, "--live", str(users), out=out))
    assert_one_line(code, err, "did not write", exit_code=2)
    assert (users / "seg_00000.ts").read_bytes() == b"the user's own segment"


def test_class6_live_dir_is_locked_and_only_our_files_replaced(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               media: Path, fake_backend: None) -> None:
    from liveavatar_lite.decode.hls import HlsWriter, read_playlist
    from liveavatar_lite.decode.video import VideoSpec

    live = tmp_path / "live"
    holder = HlsWriter.open(live, VideoSpec(64, 64), media / "speech.wav", [])  # another render writes there
    code, err = run_cli(capsys, *gen(tmp_path, media, "--live", str(live), out=tmp_path / "b.mp4"))
    assert_one_line(code, err, "another render is writing its live output", exit_code=2)
    assert not (tmp_path / "b.mp4").exists()
    holder.close()
    (live / "notes.txt").write_text("keep me")
    assert run_cli(capsys, *gen(tmp_path, media, "--live", str(live), out=tmp_path / "b.mp4"))[0] == 0
    assert run_cli(capsys, *gen(tmp_path, media, "--live", str(live), "--num-clip", "1",
                                out=tmp_path / "c.mp4"))[0] == 0  # a later render replaces our files only
    entries, ended = read_playlist(live / "index.m3u8")
    assert [e[0] for e in entries] == ["seg_00000.ts"] and ended
    assert sorted(p.name for p in live.iterdir() if not p.name.startswith(".")) == ["index.m3u8", "notes.txt",
                                                                                    "seg_00000.ts"]
    assert (live / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ class 7

def test_class7_download_from_a_silent_endpoint_times_out(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    from liveavatar_lite.artifact import download as dl

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (the kernel does) and never answers
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(dl, "HUB_READ_S", 2.0)
    try:
        t0 = time.monotonic()
        code, err = run_cli(capsys, "download", str(tmp_path / "ckpt"))
        assert time.monotonic() - t0 < 120
    finally:
        silent.close()
    assert_one_line(code, err, "cannot fetch", exit_code=2)
    import huggingface_hub

    huggingface_hub.close_session()  # the next user of the shared client gets a fresh one


def test_class7_fifo_batch_file_is_refused_without_waiting(tmp_path: Path) -> None:
    from liveavatar_lite.farm.jobs import JobDefaults, read_jobs

    os.mkfifo(tmp_path / "jobs.jsonl")
    with pytest.raises(UserError, match="FIFO"):
        read_jobs(tmp_path / "jobs.jsonl", JobDefaults())


# ------------------------------------------------------------------------------------------ class 8

def _batch(root: Path, lines: int, last: str | None = None) -> Path:
    line = json.dumps({"image": "photo.png", "audio": "speech.wav", "prompt": "a person talking",
                       "out": "out/v{}.mp4", "size": "64*64"})
    with open(root / "jobs.jsonl", "w") as f:
        for i in range(lines):
            f.write(line.replace("{}", str(i)) + "\n")
        if last is not None:
            f.write(last + "\n")
    return root / "jobs.jsonl"


def test_class8_big_batches_validate_and_report_the_bad_last_line(tmp_path: Path, media: Path) -> None:
    from liveavatar_lite.farm.jobs import JobDefaults, read_jobs

    for name in ("photo.png", "speech.wav"):
        shutil.copy(media / name, tmp_path / name)
    n = 50_000  # a million-line batch in small: no timing here (tools/bench_farm_batch.py measures the speed)
    jobs = read_jobs(_batch(tmp_path, n), JobDefaults())
    assert len(jobs) == n and {(j.width, j.height, j.clips) for j in jobs} == {(64, 64, 2)}
    assert jobs[-1].out == (tmp_path / "out" / f"v{n - 1}.mp4").resolve() and jobs[-1].line == n
    bad_last = {
        '{"image": "photo.png", "audio": "speech.wav", "prompt": "p", "out": "x.mp4", "sede": 1}': "unknown field",
        "[" * 30_000 + "]" * 30_000: "not JSON",
        '{"image": ' + "[" * 50 + "]" * 50 + "}": "not JSON",
        '{"image": "photo.png", "audio": "speech.wav", "prompt": "p", "out": "' + "x" * 70_000 + '.mp4"}': "64 KB",
        '{"image": "photo.png", "audio": "speech.wav", "prompt": "p", "out": "out/v5.mp4"}': "also the out of line 6",
        '{"imgae": "photo.png", "audio": "speech.wav", "prompt": "a person talking", "out": "x.mp4"}': "'imgae'",
        '{"image": "photo.png", "audio": "speech.wav", "prompt": "a person talking", "out": "x.mp4", '
        '"size": "64*64", "num_clip": true}': "'num_clip' must be an integer",
        '{"image": "photo.png", "audio": "speech.wav", "prompt": "a person talking", "out": "x.avi", '
        '"size": "64*64"}': "must end in .mp4",
    }
    for last, match in bad_last.items():
        with pytest.raises(UserError, match=match) as e:
            read_jobs(_batch(tmp_path, n, last), JobDefaults())
        assert f"jobs.jsonl:{n + 1}:" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ class 10

def _interrupted(capsys: pytest.CaptureFixture[str], root: Path, media: Path, *extra: str) -> Path:
    """A render to root/out/o.mp4 killed while muxing (every clip done); its work dir."""
    import liveavatar_lite.decode.video as video

    real = video.mux_segments
    video.mux_segments = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    try:
        code, _ = run_cli(capsys, *gen(root, media, *extra))
    finally:
        video.mux_segments = real
    assert code == 130
    return RenderWorkDir.path_for(root / "out" / "o.mp4")


SEGMENT_DAMAGE = {
    "garbage-first": ("clip_00000.mp4", lambda p: p.write_bytes(os.urandom(p.stat().st_size))),
    "truncated-last": ("clip_00001.mp4", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "one-bit-first": ("clip_00000.mp4", lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:])),
}


@pytest.mark.parametrize("name", sorted(SEGMENT_DAMAGE))
def test_class10_resume_rerenders_a_damaged_clip_identically(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             media: Path, fake_backend: None, name: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    assert run_cli(capsys, *gen(clean, media))[0] == 0
    work = _interrupted(capsys, tmp_path, media)
    segment, damage = SEGMENT_DAMAGE[name]
    damage(work / segment)
    code, err = run_cli(capsys, *gen(tmp_path, media, "--resume"))
    assert code == 0, err
    assert "does not match its checksum" in caplog.text
    assert (tmp_path / "out" / "o.mp4").read_bytes() == (clean / "out" / "o.mp4").read_bytes()
    assert not work.exists()


def test_class10_too_short_speech_leaves_no_work_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     media: Path, fake_backend: None) -> None:
    code, err = run_cli(capsys, *gen(tmp_path, media, audio="tiny.wav"))
    assert_one_line(code, err, "ms long", exit_code=2)
    _untouched(tmp_path)


# ------------------------------------------------------------------------------------------ traps

def test_trap_generate_does_not_overwrite_without_asking(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         media: Path, fake_backend: None) -> None:
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()
    out.write_bytes(b"last week's video")
    code, err = run_cli(capsys, *gen(tmp_path, media))
    assert_one_line(code, err, "--overwrite", exit_code=2)
    assert out.read_bytes() == b"last week's video" and not RenderWorkDir.path_for(out).exists()
    assert run_cli(capsys, *gen(tmp_path, media, "--overwrite"))[0] == 0
    assert out.read_bytes() != b"last week's video" and out.stat().st_size > 1000


def test_trap_ram_reserve_for_the_os(caplog: pytest.LogCaptureFixture) -> None:
    from liveavatar_lite.pipeline.memory import host_budget_bytes, physical_ram_bytes

    physical = physical_ram_bytes()
    assert physical is not None
    with caplog.at_level(logging.INFO, logger="liveavatar_lite.pipeline.memory"):
        ram = host_budget_bytes(None)
    assert ram == pytest.approx(max(0.0, physical - max(4e9, 0.15 * physical)))
    assert "left for the OS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="liveavatar_lite.pipeline.memory"):
        host_budget_bytes(physical / 1e9)  # --ram = all of it
    assert any(r.levelno == logging.WARNING and "for the OS" in r.getMessage() for r in caplog.records)


def test_trap_cpu_ram_budget_message_names_no_vram(capsys: pytest.CaptureFixture[str], tiny_artifact: Path,
                                                   tmp_path: Path, media: Path) -> None:
    code, err = run_cli(capsys, "generate", "--no-progress", "--artifact", str(tiny_artifact), "--image",
                        str(media / "photo.png"), "--audio", str(media / "speech.wav"), "--prompt", "a person",
                        "--out", str(tmp_path / "o.mp4"), "--size", "64*64", "--ram", "0.0001",
                        "--cache-dir", str(tmp_path / "cache"))
    assert_one_line(code, err, "RAM", exit_code=3)
    assert "VRAM" not in err and "1000000" not in err


def test_trap_third_party_warnings_only_with_verbose() -> None:
    import sys

    script = ("import sys, warnings\n"
              "from liveavatar_lite.cli import main\n"
              "main(['plan', '14b', '--format', 'int8', '--vram', '24', *sys.argv[1:]])\n"
              "warnings.warn_explicit('a third-party deprecation', UserWarning, 'torchvision/io.py', 1, "
              "module='torchvision')\n")
    for verbose, shown in (([], False), (["-v"], True)):
        r = subprocess.run([sys.executable, "-c", script, *verbose], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert ("a third-party deprecation" in r.stderr) is shown, r.stderr


def test_trap_setup_and_quickstart_scripts(tmp_path: Path) -> None:
    bad = subprocess.run(["bash", str(REPO / "tools/setup.sh"), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    helped = subprocess.run(["bash", str(REPO / "tools/setup.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--browser" in helped.stdout and "--ci" in helped.stdout
    # CI runs the README's command as written; CI=true makes it install what the whole suite needs (as --ci)
    assert "bash tools/setup.sh" in (REPO / ".ci/run").read_text()
    setup = (REPO / "tools/setup.sh").read_text()
    assert 'if [ "${CI:-}" = true ]; then EXTRAS=dev,bnb,farm; BROWSER=1' in setup
    assert setup.index("apt-get install") > setup.index('if [ "$BROWSER" = 1 ]')  # chromium only when asked
    assert "--quiet" not in setup  # pip shows its progress
    # quickstart never deletes a directory it did not make
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / "afile").write_text("x")
    for target in (mine, tmp_path / "afile"):
        r = subprocess.run(["bash", str(REPO / "tools/quickstart.sh"), str(target)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "quickstart:" in r.stderr, r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and (tmp_path / "afile").read_text() == "x"
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and "tools/setup.sh --all" in readme
