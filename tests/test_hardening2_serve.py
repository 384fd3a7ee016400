"""Issue 25, the service under hostile use: a real `liveavatar-lite serve` process over HTTP.

Per class (docs/serve.md "Limits"): each case gets a 4xx with a one-line JSON error (or the server
refuses to start with one line), in bounded time, with the server's RSS growing by less than a
bound; nothing finished is lost, nothing outside the state dir is touched, and the service renders
a valid job afterwards.

- class 1, damaged state: queue.sqlite3 missing, empty, restored without its WAL (an older copy):
  the server starts and keeps every job folder and blob; random bytes, another schema, a directory:
  the start is refused with one line naming the file, and nothing is deleted;
- class 2, slowloris: 300 connections that never finish their headers, one whose body never comes:
  /healthz and a job still answer; the dawdlers are closed by the server;
- class 3, memory bombs: absurd and odd sample rates, a header that claims hours, a 12000x12000 and a
  40000x40000 PNG of a few hundred bytes;
- class 4, photo formats: EPS, TIFF, GIF, ICO, PDF;
- class 9: a multipart body without its closing boundary, a NUL in an avatar's prompt, a full state dir (507).
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("av")
psutil = pytest.importorskip("psutil")

from media_fixtures import decoded_frames, write_speech  # noqa: E402
from render_helpers import PROMPT, SIZE, cli_command, render_env  # noqa: E402
from serve_helpers import ServeProcess, job_data, job_files  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdef"
UPLOAD_TIMEOUT_S = 4
MAX_RSS_GROWTH = 150e6  # what all the bombs of one test may add to the server's RSS, together


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, media: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve-hostile2")
    proc = ServeProcess(tiny_artifact, root / "state", "--max-audio-seconds", "10", "--request-timeout",
                        str(UPLOAD_TIMEOUT_S), token=TOKEN, cache_dir=media / "cache")
    with proc:
        yield proc


def _one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"] and len(body["error"]) < 300, body
    return body["error"]


def _rss(server: ServeProcess) -> int:
    assert server.proc is not None
    return psutil.Process(server.proc.pid).memory_info().rss


def _state_files(state: Path) -> dict[str, int]:
    """Blobs and job files (name -> size): what a refused request or a start must not delete."""
    return {p.relative_to(state).as_posix(): p.stat().st_size for p in sorted(state.rglob("*"))
            if p.is_file() and p.parts[len(state.parts)] in ("blobs", "jobs")}


def _render_one(server: ServeProcess, media: Path, seed: int = 3) -> dict:
    """The service still renders: a one-clip job ends done with a video of decodable frames."""
    r = server.client.post("/v1/jobs", files=job_files(media), data=job_data(num_clip=1, seed=seed))
    assert r.status_code == 201, r.text
    job = server.wait_for(r.json()["id"], "done", timeout=600)
    video = server.client.get(job["video"])
    assert video.status_code == 200
    path = server.state_dir.parent / f"check-{job['id']}.mp4"
    path.write_bytes(video.content)
    frames = decoded_frames(path)
    assert frames.shape[0] == 45 and frames.dtype == np.uint8
    path.unlink()
    return job


def _post_job(server: ServeProcess, media: Path, image: tuple | None = None, audio: tuple | None = None,
              **data: object) -> httpx.Response:
    files = job_files(media)
    if image is not None:
        files["image"] = image
    if audio is not None:
        files["audio"] = audio
    return server.client.post("/v1/jobs", files=files, data=job_data(**data))


# ------------------------------------------------------------------------------------------ media builders

def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG of a few hundred bytes whose header claims width x height (one all-zero row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * (width + 1), 9)  # the first row only: the rest would be decoded later
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _wav_with_rate(src: Path, rate: int) -> bytes:
    """`src` (a PCM wav) with its header's sample rate (and byte rate) replaced: the bytes stay small."""
    data = bytearray(src.read_bytes())
    assert data[:4] == b"RIFF" and data[12:16] == b"fmt "
    channels, bits = struct.unpack("<H", data[22:24])[0], struct.unpack("<H", data[34:36])[0]
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", min(rate * channels * bits // 8, 2**32 - 1))
    return bytes(data)


@pytest.fixture(scope="module")
def bombs(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes]]:
    import soundfile as sf

    root = tmp_path_factory.mktemp("bombs")
    short = write_speech(root / "short.wav", 0.5, rate=16000, channels=1)
    sf.write(root / "hours.flac", np.zeros(4000 * 3600, np.int16), 4000, subtype="PCM_16")  # claims one hour
    return {
        "rate-2^31": ("audio", _wav_with_rate(short, 2**31 - 1)),
        "rate-1e6": ("audio", _wav_with_rate(short, 1_000_000)),
        "rate-odd-44101": ("audio", _wav_with_rate(short, 44101)),  # a 5.6 GB resampling kernel
        "rate-odd-191999": ("audio", _wav_with_rate(short, 191_999)),
        "hour-long-flac": ("audio", (root / "hours.flac").read_bytes()),
        "png-12000": ("image", _png_header_only(12000, 12000)),
        "png-40000": ("image", _png_header_only(40000, 40000)),
    }


BOMB_STATUS = {"hour-long-flac": 413}


# ------------------------------------------------------------------------------------------ class 3

def test_class3_memory_bombs_are_refused_from_their_headers(server: ServeProcess, media: Path,
                                                            bombs: dict[str, tuple[str, bytes]]) -> None:
    before_files = _state_files(server.state_dir)
    rss0 = _rss(server)
    for name, (field, payload) in bombs.items():
        t0 = time.monotonic()
        upload = (f"{name}.{'png' if field == 'image' else 'wav'}", payload, "application/octet-stream")
        r = _post_job(server, media, **{field: upload})
        error = _one_line_error(r, BOMB_STATUS.get(name, 400))
        assert time.monotonic() - t0 < 30, name  # refused from the header: no decode, no resampling
        assert ("pixels" in error) if field == "image" else ("Hz" in error or "s" in error), (name, error)
    assert _rss(server) - rss0 < MAX_RSS_GROWTH, (rss0, _rss(server))
    assert not list((server.state_dir / "tmp").iterdir())
    assert _state_files(server.state_dir) == before_files
    _render_one(server, media)


# ------------------------------------------------------------------------------------------ class 4

def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
            b"newpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n")


def _pil_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, format=fmt)
    return buf.getvalue()


PHOTO_CASES = {"eps": _eps, "tiff": lambda: _pil_bytes("TIFF"), "gif": lambda: _pil_bytes("GIF"),
               "ico": lambda: _pil_bytes("ICO"), "pdf": lambda: _pil_bytes("PDF")}


def test_class4_only_photo_formats_are_decoded(server: ServeProcess, media: Path) -> None:
    before_files = _state_files(server.state_dir)
    for name, make in PHOTO_CASES.items():
        payload = make()
        r = _post_job(server, media, image=(f"x.{name}", payload, "image/png"))
        assert "not a photo in a supported format" in _one_line_error(r, 400), name
        r = server.client.post("/v1/avatars", files={"image": (f"x.{name}", payload, "image/png")},
                               data={"size": SIZE})
        assert "not a photo in a supported format" in _one_line_error(r, 400), name
    assert _state_files(server.state_dir) == before_files
    for fmt in ("JPEG", "WEBP", "BMP"):  # the allowed ones still work (framing only: no render each)
        r = server.client.post("/v1/avatars", files={"image": (f"x.{fmt}", _pil_bytes(fmt), "image/png")},
                               data={"size": SIZE})
        assert r.status_code in (200, 201), (fmt, r.text)
    _render_one(server, media, seed=4)


# ------------------------------------------------------------------------------------------ class 9

def _multipart(boundary: str, fields: dict[str, tuple[str | None, bytes]]) -> bytes:
    parts = []
    for name, (filename, value) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts)


def test_class9_small_ones(server: ServeProcess, media: Path) -> None:
    before_files = _state_files(server.state_dir)
    boundary = "b0undary1234"
    fields = {"image": ("p.png", (media / "photo.png").read_bytes()), "audio": ("s.wav", (media / "speech.wav").read_bytes()),
              "size": (None, SIZE.encode()), "num_clip": (None, b"1"), "prompt": (None, PROMPT.encode())}
    body = _multipart(boundary, fields)  # ... and no closing "--b0undary1234--"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    r = server.client.post("/v1/jobs", content=body, headers=headers)
    assert "closing boundary" in _one_line_error(r, 400)
    r = server.client.post("/v1/jobs", content=body[: len(body) // 2], headers=headers)  # cut mid-file
    _one_line_error(r, 400)
    r = server.client.post("/v1/jobs", content=body + f"--{boundary}--\r\n".encode(), headers=headers)
    assert r.status_code == 201, r.text  # the same body, closed: accepted
    server.wait_for(r.json()["id"], "done", timeout=600)
    before_files = _state_files(server.state_dir)
    # a NUL in the prompt: refused by /v1/avatars as by /v1/jobs
    for path, files in (("/v1/avatars", {"image": ("p.png", (media / "photo.png").read_bytes(), "image/png")}),
                        ("/v1/jobs", job_files(media))):
        r = server.client.post(path, files=files, data={"prompt": "a person\0talking", "size": SIZE})
        assert "NUL" in _one_line_error(r, 400), path
    assert _state_files(server.state_dir) == before_files
    _render_one(server, media, seed=5)


def test_class9_token_file_that_is_not_ascii_or_a_fifo(tiny_artifact: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("pässwörd-0123456789abcdef\n", encoding="utf-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, match in ((token, "printable ASCII"), (fifo, "FIFO")):
        t0 = time.monotonic()
        proc = subprocess.run(cli_command("serve", str(tiny_artifact), "--state-dir", str(tmp_path / "state"),
                                          "--port", "0", "--token-file", str(path)),
                              env=render_env(), capture_output=True, text=True, timeout=120)
        assert time.monotonic() - t0 < 120
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and match in lines[0], proc.stderr
    assert not (tmp_path / "state").exists()


# ------------------------------------------------------------------------------------------ class 2

def _dawdler(port: int, text: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(text)
    return s


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    """Whether the server closes `s` (EOF or reset) within `timeout`, reading whatever it sends first."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def test_class2_slow_clients_cannot_starve_the_server(server: ServeProcess, media: Path) -> None:
    from liveavatar_lite.serve.server import BODY_SLACK_S, HEADER_TIMEOUT_S

    rss0 = _rss(server)
    headers_never_end = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "  # no blank line: headers unfinished
    sockets = [_dawdler(server.port, headers_never_end) for _ in range(300)]
    body_never_comes = _dawdler(server.port, (
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 100000\r\n\r\n--zz\r\n").encode())
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]  # send nothing
    try:
        for _ in range(3):  # while they dawdle, a health check and the API answer at once
            t0 = time.monotonic()
            assert server.client.get("/healthz").status_code == 200
            assert server.client.get("/v1/jobs").status_code == 200
            assert time.monotonic() - t0 < 10
        job = _render_one(server, media, seed=6)  # and a job renders
        assert job["state"] == "done"
        # the dawdlers are closed by the server: at once (beyond the per-client quota) or at the header deadline
        bound = HEADER_TIMEOUT_S + 30
        assert all(_closed_by_server(s, bound) for s in sockets + silent)
        assert _closed_by_server(body_never_comes, UPLOAD_TIMEOUT_S + BODY_SLACK_S + 30)
    finally:
        for s in sockets + silent + [body_never_comes]:
            s.close()
    assert _rss(server) - rss0 < MAX_RSS_GROWTH
    assert server.client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------ class 1

def _start_refused(tiny_artifact: Path, state: Path) -> str:
    proc = subprocess.run(cli_command("serve", str(tiny_artifact), "--state-dir", str(state), "--port", "0",
                                      "--size", SIZE), env=render_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("INFO ", "WARNING "))]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_class1_damaged_queue_database_never_deletes_finished_work(tiny_artifact: Path, media: Path,
                                                                   tmp_path: Path) -> None:
    state = tmp_path / "state"
    outside = tmp_path / "outside.txt"
    outside.write_text("not the service's")
    with ServeProcess(tiny_artifact, state, cache_dir=media / "cache") as s:
        pass  # a fresh state dir: the database before any job
    db = state / "queue.sqlite3"
    shutil.copy(db, tmp_path / "old.sqlite3")
    with ServeProcess(tiny_artifact, state, cache_dir=media / "cache") as s:
        done = _render_one(s, media, seed=9)
    finished = _state_files(state)
    assert f"jobs/{done['id']}/video.mp4" in finished and any(k.startswith("blobs/") for k in finished)

    def restored_without_wal() -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copy(tmp_path / "old.sqlite3", db)

    starts = {"restored-without-wal": restored_without_wal,
              "missing": lambda: [Path(f"{db}{x}").unlink(missing_ok=True) for x in ("", "-wal", "-shm")],
              "empty": lambda: db.write_bytes(b"")}
    for name, damage in starts.items():
        damage()
        with ServeProcess(tiny_artifact, state, cache_dir=media / "cache") as s:
            assert _state_files(state) == {**finished, **_state_files(state)}, name  # nothing finished deleted
            for f in finished:
                assert (state / f).stat().st_size == finished[f], (name, f)
            if name == "empty":
                _render_one(s, media, seed=10)  # the service renders on the database it has
                # ... and the blobs it now knows may be cleaned up later, but never the older ones
    for f in finished:
        assert (state / f).is_file()
    refused = {
        "random-bytes": lambda: db.write_bytes(os.urandom(8192)),
        "another-schema": lambda: _other_schema(db),
        "a-directory": lambda: (db.unlink(), db.mkdir()),
    }
    for name, damage in refused.items():
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        if db.is_dir():
            db.rmdir()
        damage()
        line = _start_refused(tiny_artifact, state)
        assert str(db) in line and "queue database" in line, (name, line)
        for f in finished:
            assert (state / f).is_file(), (name, f)
    assert outside.read_text() == "not the service's"


def _other_schema(db: Path) -> None:
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE jobs (name TEXT, value INTEGER)")
    con.execute("INSERT INTO jobs VALUES ('x', 1)")
    con.commit()
    con.close()


# ------------------------------------------------------------------------------------------ class 9: full disk

@pytest.mark.slow
def test_class9_full_state_dir_is_507_then_renders(tiny_artifact: Path, media: Path, tmp_path: Path) -> None:
    from hostile_fixtures import fill_disk, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        state = disk / "state"
        with ServeProcess(tiny_artifact, state, cache_dir=media / "cache") as s:
            filler = fill_disk(disk, 64 * 1024)
            r = s.client.post("/v1/jobs", files=job_files(media), data=job_data(num_clip=1))
            error = _one_line_error(r, 507)
            assert "disk is full" in error
            assert not list((state / "tmp").iterdir())
            filler.unlink()
            _render_one(s, media, seed=11)
