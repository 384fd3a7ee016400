"""Talk sessions as a client sees them: a real `serve` process (token, --keep-sessions) over HTTP + WebSocket.

One server for the module (the tiny artifact, 64*64). Each test starts with no session open and the
worker free, and waits for states (messages, session states), never for durations. The tests:
- a session streams speech in (PCM at the speech file's own rate, 100 ms messages, then silence
  like a microphone), ends the utterance, closes: the client gets ready, media, an init segment and
  one fragment + metadata per block, then "ended" and close 1000; the bytes it received are the
  bytes the server sent, and the muxer applied to the frames and speech the session rendered
  gives those bytes again; /metrics counts the block latencies and the closed session;
- one session at a time (429, one line), and bad input on the WebSocket (token, unknown session,
  format, rate, PCM framing, NaN, an oversized message, an unknown control message): one-line JSON
  error, the close code, the session ended, the worker free;
- a client that vanishes mid-session: the session ends ("disconnected"), the same worker renders
  the next job;
- a session nobody connects to expires, and a client that says nothing ends its session, after
  --session-idle (longer than the HTTP guard's body deadline: a WebSocket outlives it);
- a worker killed mid-session: one error line, close 1011, a fresh worker;
- a drain waits for the open session, refuses new ones, then the server exits 0;
- the page's talk mode in headless Chromium with a fake microphone: it streams the speech in, its
  buttons reach the session, it plays the avatar, and the bytes it received are the session's.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
av = pytest.importorskip("av")
websocket = pytest.importorskip("websocket")  # websocket-client

from render_helpers import PROMPT, SIZE  # noqa: E402
from serve_helpers import ServeProcess, submit, until  # noqa: E402

from liveavatar_lite.decode.fmp4 import FragmentMuxer, FragmentSpec  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdef"
IDLE_S = 20  # --session-idle
# --request-timeout: an upload's limit; the HTTP guard gives a request's body that plus 15 s (server.py), and
# a WebSocket must outlive it (the idle test's session lasts IDLE_S > 1 + 15 s)
REQUEST_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, media: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve-talk")
    proc = ServeProcess(tiny_artifact, root / "state", "--keep-sessions", "--session-idle", str(IDLE_S),
                        "--request-timeout", str(REQUEST_TIMEOUT_S), token=TOKEN, cache_dir=media / "cache")
    with proc:
        yield proc


@pytest.fixture(autouse=True)
def no_session(server: ServeProcess) -> None:
    """Every test starts with no talk session waiting or open (a failed test's is ended) and the worker free."""
    for session in server.client.get("/v1/sessions").json()["sessions"]:
        if session["state"] != "ended":
            server.client.delete(f"/v1/sessions/{session['id']}")
            _ended(server, session["id"])
    server.drain()


def _create(server: ServeProcess, media: Path, **fields: str) -> dict:
    r = server.client.post("/v1/sessions", files={"image": ("photo.png", (media / "photo.png").read_bytes())},
                           data={"prompt": PROMPT, "size": SIZE, "seed": "5", **fields})
    assert r.status_code == 201, r.text
    return r.json()


def _create_from_avatar(server: ServeProcess, avatar: str) -> dict:
    """A session from a pre-encoded photo (POST /v1/avatars): multipart without a file."""
    r = server.client.post("/v1/sessions", files={"avatar": (None, avatar), "prompt": (None, PROMPT),
                                                  "seed": (None, "5")})
    assert r.status_code == 201, r.text
    assert r.json()["size"] == SIZE  # the avatar's size
    return r.json()


def _connect(server: ServeProcess, session: dict, token: str | None = TOKEN, **query: object):
    params = {"token": token, "rate": 16000, "format": "f32", **query}
    q = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
    return websocket.create_connection(f"ws://127.0.0.1:{server.port}{session['stream']}?{q}", timeout=300)


def _messages(ws, until_text=None):
    """(texts as dicts, binaries, close code or None): messages until `until_text(doc)` is true or the close."""
    texts, binaries = [], []
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return texts, binaries, int.from_bytes(data[:2], "big") if len(data) >= 2 else None
        if opcode == websocket.ABNF.OPCODE_TEXT:
            texts.append(json.loads(data))
            if until_text is not None and until_text(texts[-1]):
                return texts, binaries, None
        elif opcode == websocket.ABNF.OPCODE_BINARY:
            binaries.append(bytes(data))


def _one_line_error(texts: list[dict], code: int | None, expected_code: int) -> str:
    errors = [t for t in texts if t.get("type") == "error"]
    assert len(errors) == 1 and code == expected_code, (texts, code)
    line = errors[0]["error"]
    assert line and "\n" not in line and len(line) < 300
    return line


def _session_state(server: ServeProcess, session_id: str) -> dict:
    r = server.client.get(f"/v1/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _ended(server: ServeProcess, session_id: str) -> dict:
    return until(lambda: (s := _session_state(server, session_id))["state"] == "ended" and s, 120,
                 "the session to end")


def _metric(server: ServeProcess, series: str) -> float:
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} is not in /metrics")


def _speech(media: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wave, rate = sf.read(str(media / "speech.wav"), dtype="float32")
    return wave.mean(axis=1).astype("<f4"), rate


class _Microphone(threading.Thread):
    """Sends `speech` in 100 ms messages, then {"type": "end"}, then 100 ms of silence every 100 ms
    until stopped (a live microphone), as a client of `ws`."""

    def __init__(self, ws, speech: np.ndarray, rate: int) -> None:
        super().__init__(daemon=True)
        self.ws, self.speech, self.rate = ws, speech, rate
        self.stop = threading.Event()

    def run(self) -> None:
        step = self.rate // 10
        try:
            for at in range(0, len(self.speech), step):
                self.ws.send_binary(self.speech[at:at + step].tobytes())
            self.ws.send(json.dumps({"type": "end"}))
            while not self.stop.wait(0.1):
                self.ws.send_binary(np.zeros(step, "<f4").tobytes())
        except (websocket.WebSocketException, OSError):
            pass


def reencoded(keep: Path) -> bytes:
    """The muxer applied to what the session rendered (--keep-sessions): its frames and speech, block by block."""
    blocks = [json.loads(line) for line in (keep / "blocks.jsonl").read_text().splitlines()]
    frames = np.fromfile(keep / "frames.u8", np.uint8)
    audio = np.fromfile(keep / "audio.f32", "<f4")
    shape = blocks[0]["shape"]
    mux = FragmentMuxer(FragmentSpec(width=shape[2], height=shape[1], fps=25))
    out, f, a = [mux.init_segment()], 0, 0
    for b in blocks:
        if b["type"] == "flush":
            out.append(mux.flush())
            continue
        n = int(np.prod(b["shape"]))
        out.append(mux.block(frames[f:f + n].reshape(b["shape"]), audio[a:a + b["samples"]]))
        f, a = f + n, a + b["samples"]
    assert f == frames.size and a == audio.size
    return b"".join(out)


def session_frames(keep: Path) -> np.ndarray:
    shape = json.loads((keep / "blocks.jsonl").read_text().splitlines()[0])["shape"]
    return np.fromfile(keep / "frames.u8", np.uint8).reshape(-1, *shape[1:])


def decoded(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_session_streams_speech_in_and_the_avatar_out(server: ServeProcess, media: Path) -> None:
    worker = server.worker_pid()
    latencies = _metric(server, "liveavatar_session_block_latency_seconds_count")
    closed = _metric(server, 'liveavatar_sessions_total{outcome="closed"}')
    session = _create(server, media)
    assert session["state"] in ("waiting", "open") and session["idle"] == "listen"
    ws = _connect(server, session, rate=None)  # rate defaults to 16000; the speech is sent at its own below
    ws.close()
    _ended(server, session["id"])  # a client that leaves at once: the session ends, the next one may start
    session = _create(server, media)
    speech, rate = _speech(media)
    ws = _connect(server, session, rate=rate)
    texts, binaries, code = _messages(ws, lambda t: t["type"] == "ready")
    assert code is None and [t["type"] for t in texts][-1] == "ready"
    mic = _Microphone(ws, speech, rate)
    mic.start()
    # utterance 0 (the speech) renders block by block; a block of utterance 1 (the microphone's silence
    # after "end") means utterance 0 is complete
    more, media_out, _ = _messages(ws, lambda t: t["type"] == "block" and t["utterance"] not in (None, 0))
    mic.stop.set()
    mic.join(10)
    ws.send(json.dumps({"type": "close"}))
    tail, tail_out, code = _messages(ws)
    texts, binaries = texts + more + tail, binaries + media_out + tail_out
    assert code == 1000 and texts[-1] == {"type": "ended", "reason": "closed"}, texts[-3:]
    kinds = [t["type"] for t in texts]
    assert kinds.index("media") < kinds.index("block") and texts[kinds.index("media")]["mime"].startswith("video/mp4")
    blocks = [t for t in texts if t["type"] == "block"]
    speech_blocks = [b for b in blocks if b["utterance"] == 0]
    assert len(speech_blocks) >= 9 and all(b["latency_s"] > 0 for b in speech_blocks)
    assert len(binaries) >= 1 + len(blocks)  # the init segment, a fragment per block (and the tail)

    # what the client received is what the server sent, and the muxer applied to the session's frames
    received = b"".join(binaries)
    keep = server.state_dir / "sessions" / session["id"]
    assert received == (keep / "sent.bin").read_bytes()
    assert received == reencoded(keep)
    frames = session_frames(keep)
    pictures = decoded(received).astype(int)
    assert len(frames) == sum(b["frames"] for b in blocks) and pictures.shape == frames.shape
    # h264 at crf 23 on the random tiny model's noise-like frames loses much (about 20 dB PSNR), yet each
    # decoded frame is far closer to its own session frame than to the next one
    assert np.abs(pictures - frames).mean() * 2 < np.abs(pictures[:-1] - frames[1:]).mean()

    state = _ended(server, session["id"])
    assert state["reason"] == "closed"
    assert server.worker_pid() == worker
    assert _metric(server, "liveavatar_session_block_latency_seconds_count") - latencies >= len(speech_blocks)
    assert _metric(server, 'liveavatar_sessions_total{outcome="closed"}') - closed >= 1
    assert _metric(server, "liveavatar_sessions_active") == 0.0


def test_one_session_at_a_time_and_bad_input_on_the_websocket(server: ServeProcess, media: Path) -> None:
    c = server.client
    # bad requests: one line each, nothing created
    photo = {"image": ("photo.png", (media / "photo.png").read_bytes())}
    for files, data, status in ((photo, {"prompt": PROMPT, "idle": "dance"}, 400), (photo, {"prompt": ""}, 400),
                                (photo, {"prompt": PROMPT, "size": "huge"}, 400),
                                (photo, {"prompt": PROMPT, "seed": "-1"}, 400),
                                ({"image": ("photo.png", b"not an image")}, {"prompt": PROMPT}, 400),
                                ({}, {"prompt": PROMPT}, 415), (photo, {"prompt": PROMPT, "audio": "x"}, 400)):
        r = c.post("/v1/sessions", files=files or None, data=data)
        assert r.status_code == status and "\n" not in r.json()["error"], (data, r.text)
    assert c.post("/v1/sessions", data={"prompt": PROMPT},
                  headers={"Authorization": "Bearer " + "f" * 32}).status_code == 401
    assert c.get("/v1/sessions/" + "0" * 32).status_code == 404
    assert all(s["state"] == "ended" for s in c.get("/v1/sessions").json()["sessions"])
    session = _create(server, media, idle="pause")
    # a second session while one holds the worker: 429, one line, Retry-After
    r = c.post("/v1/sessions", files=photo, data={"prompt": PROMPT})
    assert r.status_code == 429 and list(r.json()) == ["error"] and "one at a time" in r.json()["error"]
    assert int(r.headers["Retry-After"]) >= 1

    # a wrong or missing token, an unknown session: the session is untouched
    for token, path in ((None, session["stream"]), ("f" * 32, session["stream"]),
                        (TOKEN, "/v1/sessions/" + "0" * 32 + "/stream")):
        ws = _connect(server, {"stream": path}, token=token)
        _one_line_error(*_messages(ws)[::2], 1008)
    assert _session_state(server, session["id"])["state"] != "ended"
    # a second client on the same session: refused, the first one goes on; DELETE ends the session
    first = _connect(server, session)
    _messages(first, lambda t: t["type"] == "ready")
    assert "already has a client" in _one_line_error(*_messages(_connect(server, session))[::2], 1008)
    assert c.delete(f"/v1/sessions/{session['id']}").status_code == 200
    texts, _, code = _messages(first)
    assert code == 1000 and texts[-1]["type"] == "ended" and _ended(server, session["id"])["reason"] == "closed"

    def bad(query: dict, send=None, expected: int = 1003) -> str:
        """A fresh session, one bad thing on its WebSocket: the one-line error, the close code, the end."""
        nonlocal session
        if _session_state(server, session["id"])["state"] == "ended":
            session = _create(server, media, idle="pause")
        ws = _connect(server, session, **query)
        if send is not None:
            _messages(ws, lambda t: t["type"] == "ready")
            send(ws)
        texts, _, code = _messages(ws)
        line = _one_line_error(texts, code, expected)
        assert _ended(server, session["id"])["reason"].startswith("error")
        return line

    assert "format" in bad({"format": "mp3"})
    assert "rate" in bad({"rate": "fast"})
    assert "rate" in bad({"rate": 1000})
    assert "4-byte samples" in bad({}, lambda ws: ws.send_binary(b"\0" * 7))
    assert "NaN" in bad({}, lambda ws: ws.send_binary(np.array([0, np.nan], "<f4").tobytes()))
    assert "[-1, 1]" in bad({}, lambda ws: ws.send_binary(np.array([0, 1.5], "<f4").tobytes()))
    assert "over the limit" in bad({}, lambda ws: ws.send_binary(bytes(300_000)), expected=1009)
    assert "type" in bad({}, lambda ws: ws.send('{"type": "sing"}'))
    assert "type" in bad({}, lambda ws: ws.send("not json"))
    # far over the limit (more than 4x): the WebSocket layer refuses the message itself, 1009 without a text
    if _session_state(server, session["id"])["state"] == "ended":
        session = _create(server, media, idle="pause")
    ws = _connect(server, session)
    _messages(ws, lambda t: t["type"] == "ready")
    ws.send_binary(bytes(1_100_000))
    texts, _, code = _messages(ws)
    assert code == 1009 and not [t for t in texts if t["type"] == "error"]
    assert _ended(server, session["id"])["reason"] == "disconnected"
    until(lambda: not server.wait_ready()["worker"]["busy"], 120, "the worker to be free")


def test_a_client_that_vanishes_mid_session_leaves_the_worker_serving(server: ServeProcess, media: Path) -> None:
    worker = server.worker_pid()
    r = server.client.post("/v1/avatars", files={"image": ("photo.png", (media / "photo.png").read_bytes())},
                           data={"size": SIZE, "prompt": PROMPT})
    assert r.status_code in (200, 201), r.text
    avatar = r.json()["id"]
    until(lambda: server.client.get(f"/v1/avatars/{avatar}").json()["state"] == "ready", 300, "the avatar")
    session = _create_from_avatar(server, avatar)
    speech, rate = _speech(media)
    ws = _connect(server, session, rate=rate)
    _messages(ws, lambda t: t["type"] == "ready")
    mic = _Microphone(ws, speech, rate)
    mic.start()
    _messages(ws, lambda t: t["type"] == "block" and t["utterance"] == 0)  # mid-utterance
    job = submit(server, media, seed=3, num_clip=1)  # a job waits while the session holds the worker
    assert server.job(job)["state"] == "queued" and server.wait_ready()["worker"]["busy"]
    ws.sock.shutdown(socket.SHUT_RDWR)  # gone without a close frame (a crashed tab, a pulled cable)
    ws.sock.close()
    mic.stop.set()
    assert _ended(server, session["id"])["reason"] == "disconnected"
    assert server.wait_for(job, "done", timeout=600)["clips_done"] == 1
    assert server.worker_pid() == worker


def test_a_worker_death_ends_the_session_with_one_line(server: ServeProcess, media: Path) -> None:
    session = _create(server, media)
    ws = _connect(server, session)
    _messages(ws, lambda t: t["type"] == "ready")
    pid = server.worker_pid()
    os.kill(pid, signal.SIGKILL)
    texts, _, code = _messages(ws)
    assert "worker" in _one_line_error(texts, code, 1011)
    assert _ended(server, session["id"])["reason"].startswith("worker_died")
    assert server.wait_ready(300)["worker"]["pid"] != pid  # a fresh worker, ready for the next session
    assert _metric(server, 'liveavatar_sessions_total{outcome="worker_died"}') >= 1


@pytest.mark.slow
def test_a_silent_client_ends_its_session_after_the_idle_timeout(server: ServeProcess, media: Path) -> None:
    session = _create(server, media, idle="pause")  # nobody connects: it expires after --session-idle
    assert _ended(server, session["id"])["reason"].startswith("expired")
    session = _create(server, media, idle="pause")
    ws = _connect(server, session)
    texts, _, code = _messages(ws)  # nothing sent: after --session-idle the server ends it
    assert code == 1000 and texts[-1] == {"type": "ended", "reason": "idle"}
    assert _ended(server, session["id"])["reason"].startswith("idle")
    assert _metric(server, 'liveavatar_sessions_total{outcome="idle"}') >= 1


# ---- the page's talk mode in headless Chromium, with a fake microphone ---------------------------------


def test_page_talks_in_chromium_with_a_fake_microphone(server: ServeProcess, media: Path, tmp_path: Path) -> None:
    """The page captures the fake microphone (speech.wav, looped) at 16 kHz, streams it over the
    WebSocket, and plays the avatar through Media Source Extensions; its end / interrupt / stop
    buttons reach the session; the bytes it received are the bytes the server sent and the muxer
    applied to the session's own frames, and the video played without a media error."""
    from test_serve import BROWSER_FLAGS, CHROMEDRIVER, CHROMIUM

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium: `apt-get install chromium chromium-driver` (tools/setup.sh does it as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--use-file-for-fake-audio-capture={media / 'speech.wav'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    talk = lambda: driver.execute_script(  # noqa: E731 - what the page saw, without the media bytes
        "const t = window.__talk; return {state: t.state, errors: t.errors, blocks: t.blocks, bytes: t.bytes, "
        "closeCode: t.closeCode}")
    try:
        driver.get(server.url + "/")
        by_id = driver.find_element
        until(lambda: by_id("id", "auth").is_displayed(), 30, "the token prompt")
        by_id("id", "token").send_keys(TOKEN)
        by_id("id", "save-token").click()
        by_id("id", "talk-image").send_keys(str(media / "photo.png"))
        by_id("id", "talk-size").send_keys(SIZE)
        by_id("id", "talk-start").click()
        # the microphone's speech comes back as the avatar, and the video plays it
        until(lambda: talk()["errors"] or sum(b["utterance"] == 0 for b in talk()["blocks"]) >= 4, 300,
              "speech blocks in the page")
        until(lambda: talk()["errors"] or driver.execute_script(
            "return document.getElementById('talk-video').currentTime > 0.5"), 120, "the avatar to play")
        assert not talk()["errors"], talk()["errors"]
        assert by_id("id", "talk-state").text == "talking"
        assert driver.save_screenshot(str(tmp_path / "talk.png"))
        # "End of utterance": the microphone's next speech is utterance 1; "Interrupt" drops the rest of
        # it and the speech after is utterance 2 (the microphone never stops)
        by_id("id", "talk-end").click()
        until(lambda: talk()["errors"] or any(b["utterance"] == 1 for b in talk()["blocks"]), 300, "utterance 1")
        by_id("id", "talk-interrupt").click()
        until(lambda: talk()["errors"] or any(b["utterance"] == 2 for b in talk()["blocks"]), 300, "utterance 2")
        by_id("id", "talk-stop").click()
        until(lambda: talk()["state"] in ("ended", "error"), 120, "the session to end in the page")
        page = talk()
        assert page["state"] == "ended" and page["closeCode"] == 1000 and not page["errors"], page["errors"]
        video = driver.execute_script("const v = document.getElementById('talk-video'); "
                                      "return [v.error === null, v.videoWidth, v.videoHeight, v.currentTime]")
        assert video[0] and video[1:3] == [64, 64] and video[3] > 0.5
        received = base64.b64decode(driver.execute_script(
            "let s = ''; for (const p of window.__talk.received) for (let i = 0; i < p.length; i += 8192) "
            "s += String.fromCharCode.apply(null, p.subarray(i, i + 8192)); return btoa(s)"))
    finally:
        driver.quit()
    assert len(received) == page["bytes"]
    session = server.client.get("/v1/sessions").json()["sessions"][0]
    assert _ended(server, session["id"])["reason"] == "closed"
    keep = server.state_dir / "sessions" / session["id"]
    assert received == (keep / "sent.bin").read_bytes() == reencoded(keep)
    frames = session_frames(keep)
    assert decoded(received).shape == frames.shape and len(frames) == sum(b["frames"] for b in page["blocks"])
    assert sum(b["utterance"] == 0 for b in page["blocks"]) >= 4


def test_a_drain_waits_for_the_open_session_then_exits(tiny_artifact: Path, media: Path, tmp_path: Path) -> None:
    """A server of its own (the drain stops it): new sessions get 503, the open one goes on until its
    client closes it, then the server exits 0."""
    with ServeProcess(tiny_artifact, tmp_path / "state", token=TOKEN, cache_dir=media / "cache") as own:
        session = _create(own, media, idle="pause")
        ws = _connect(own, session)
        _messages(ws, lambda t: t["type"] == "ready")
        assert own.client.post("/v1/admin/drain").status_code == 202
        r = own.client.post("/v1/sessions", files={"image": ("photo.png", (media / "photo.png").read_bytes())},
                            data={"prompt": PROMPT})
        assert r.status_code == 503 and "draining" in r.json()["error"]
        assert own.proc is not None and own.proc.poll() is None  # the session holds the server up
        assert _session_state(own, session["id"])["state"] == "open"
        ws.send(json.dumps({"type": "close"}))
        texts, _, code = _messages(ws)
        assert code == 1000 and texts[-1]["type"] == "ended"
        assert own.proc.wait(timeout=120) == 0
