"""`liveavatar-lite serve` as a client sees it: a real server process (token required) over HTTP.

One server for the module (its worker loads the tiny artifact once). Each test starts from a drained
queue (`ServeProcess.drain`, autouse) and waits for states, never for durations, so the tests pass in
any order and at any machine speed; a test that needs a full queue pauses the worker (SIGSTOP) with
its job mid-render instead of racing the render. The tests:
- a job's mp4 equals the CLI's `generate` output for the same inputs and seed, while >= 30 hostile
  or malformed requests hit the server with the job mid-render: each gets a 4xx with a one-line JSON
  error, leaves nothing behind, a full queue answers 429, and the job's frames stay identical;
- a running job cancelled mid-render stops between blocks, leaves nothing, keeps the worker;
- kill -9 of the server mid-render, restart: the job resumes from its checkpoint with identical
  frames, the queued job (from a pre-encoded avatar, which renders like its photo) is not lost,
  finished results stay downloadable, the worker died with the server;
- a job that kills its worker twice fails with the reason; the worker serves again; /readyz and
  /metrics count both deaths;
- /healthz, /readyz and every metric series from the start;
- the page in a real headless Chromium (skipped without one).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("av")

from media_fixtures import decoded_frames, write_speech
from render_helpers import PROMPT, SIZE
from serve_helpers import ServeProcess, job_data, job_files, paused, process_alive, submit, until, wait_gone

TOKEN = "0123456789abcdef0123456789abcdef"
MAX_UPLOAD = 1_000_000  # bytes (--max-upload-mb 1)
UPLOAD_TIMEOUT_S = 4  # --request-timeout: receiving one upload


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, media: Path, clean_render: dict, tmp_path_factory: pytest.TempPathFactory):
    """The module's server: token, queue of 2, 1 MB uploads, 10 s of audio at most; caches shared with the CLI."""
    root = tmp_path_factory.mktemp("serve")
    proc = ServeProcess(tiny_artifact, root / "state", "--max-queue", "2", "--max-upload-mb", "1",
                        "--max-audio-seconds", "10", "--request-timeout", str(UPLOAD_TIMEOUT_S), token=TOKEN,
                        cache_dir=media / "cache")
    with proc:
        yield proc


@pytest.fixture(autouse=True)
def drained(server: ServeProcess) -> None:
    """Every test starts with nothing queued or running and the worker free (see ServeProcess.drain)."""
    server.drain()


@pytest.fixture(scope="module")
def extra_media(media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-media")
    write_speech(root / "silent.wav", 2.0, amp=0.0)
    write_speech(root / "long.wav", 11.0)
    (root / "big.png").write_bytes((media / "photo.png").read_bytes() + bytes(MAX_UPLOAD))
    shutil.copy(media / "photo.png", root / "photo.png")
    shutil.copy(media / "speech.wav", root / "speech.wav")
    return root


def _snapshot(server: ServeProcess) -> dict:
    """What a rejected request must not change: blobs, job dirs, temp uploads, job rows, the worker."""
    state = server.state_dir
    return {"blobs": sorted(p.name for p in (state / "blobs").rglob("*") if p.is_file()),
            "jobs": sorted(p.name for p in (state / "jobs").iterdir()),
            "tmp": sorted(p.name for p in (state / "tmp").iterdir()),
            "rows": len(server.client.get("/v1/jobs", params={"limit": 500}).json()["jobs"]),
            "worker": server.worker_pid()}


def _one_line_error(r: httpx.Response, status: int | tuple[int, ...]) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert body["error"] and "\n" not in body["error"] and len(body["error"]) < 300, body
    return body["error"]


def _events(server: ServeProcess, job_id: str, into: list[dict]) -> threading.Thread:
    """Read the job's server-sent events on a thread until the stream ends."""

    def read() -> None:
        with server.client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    into.append(json.loads(line[5:]))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def _oversize_chunked_body():  # a well-formed upload of 1.2 MB, sent without a length
    yield b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    for _ in range(12):
        yield bytes(100_000)
    yield b"\r\n--xyz--\r\n"


def _stalled_body():  # a client that starts an upload and stops sending
    yield b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhello'
    time.sleep(UPLOAD_TIMEOUT_S + 2)
    yield b"\r\n--xyz--\r\n"


def _frames(server: ServeProcess, job_id: str, tmp: Path) -> np.ndarray:
    r = server.client.get(f"/v1/jobs/{job_id}/video")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    path = tmp / f"{job_id}.mp4"
    path.write_bytes(r.content)
    return decoded_frames(path)


@pytest.fixture(scope="module")
def short_job(server: ServeProcess, media: Path) -> dict:
    """A finished 1-clip job (seed 8): the target of 'cancel a finished job' and the avatar comparison."""
    server.drain()  # module scope: set up before the autouse `drained`
    job_id = submit(server, media, seed=8, num_clip=1)
    return server.wait_for(job_id, "done", timeout=600)


def test_job_equals_generate_while_hostile_requests_hit_the_server(
        server: ServeProcess, media: Path, extra_media: Path, clean_render: dict, short_job: dict,
        tmp_path: Path) -> None:
    c = server.client
    job_id = submit(server, media, seed=7)
    events: list[dict] = []
    reader = _events(server, job_id, events)
    server.wait_for(job_id, "running")
    with paused(server.worker_pid()):  # the job stays mid-render until the queue checks are done
        _hostile_requests_and_a_full_queue(server, media, extra_media, short_job, job_id)

    job = server.wait_for(job_id, "done", timeout=600)
    assert job["clips_done"] == job["clips_total"] == 3 and job["worker_deaths"] == 0
    assert np.array_equal(_frames(server, job_id, tmp_path), decoded_frames(clean_render["out"]))
    reader.join(timeout=30)
    states = [e["state"] for e in events]
    assert states[-1] == "done" and "running" in states
    assert [e["clips_done"] for e in events if e["state"] == "running"][-1] >= 2  # progress came clip by clip
    assert all(e["first_frame_s"] > 0 for e in events if e["clips_done"] > 0)

    # live output: the HLS playlist is complete, and each clip plays as mp4
    playlist = c.get(f"/v1/jobs/{job_id}/live/index.m3u8")
    assert playlist.status_code == 200 and playlist.text.count("seg_") == 3 and "#EXT-X-ENDLIST" in playlist.text
    assert c.get(f"/v1/jobs/{job_id}/live/seg_00002.ts").status_code == 200
    clip = c.get(f"/v1/jobs/{job_id}/clips/1")
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    (tmp_path / "clip1.mp4").write_bytes(clip.content)
    assert np.array_equal(decoded_frames(tmp_path / "clip1.mp4"), decoded_frames(clean_render["out"])[45:93])


def _hostile_requests_and_a_full_queue(server: ServeProcess, media: Path, extra_media: Path, short_job: dict,
                                       job_id: str) -> None:
    """>= 30 hostile requests, then a full queue and racing cancels, while `job_id` is mid-render."""
    c = server.client
    before = _snapshot(server)
    wrong = {"Authorization": "Bearer " + "f" * 32}
    files, data = job_files(media), job_data(num_clip=1)
    m = extra_media

    def post(files=files, data=data, headers=None, path="/v1/jobs", **kw) -> httpx.Response:
        return c.post(path, files=files, data=data, headers=headers, **kw)

    def swap(name: str, filename: str, content: bytes) -> dict:
        return {**files, name: (filename, content, "application/octet-stream")}

    hostile = [
        # auth
        (401, lambda: httpx.post(f"{server.url}/v1/jobs", files=files, data=data)),
        (401, lambda: post(headers=wrong)),
        (401, lambda: c.get("/v1/jobs", headers={"Authorization": f"Basic {TOKEN}"})),
        (401, lambda: c.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}x"})),
        (401, lambda: httpx.get(f"{server.url}/metrics")),
        (401, lambda: c.delete(f"/v1/jobs/{job_id}", headers=wrong)),
        (401, lambda: c.get(f"/v1/jobs/{job_id}/video", headers={"Authorization": "Bearer"})),
        # uploads
        (413, lambda: post(files=swap("image", "big.png", (m / "big.png").read_bytes()))),
        (400, lambda: post(files=swap("image", "photo.png", (m / "speech.wav").read_bytes()))),
        (400, lambda: post(files=swap("image", "photo.png", b""))),
        (400, lambda: post(files=swap("audio", "speech.wav", b""))),
        (400, lambda: post(files=swap("audio", "speech.wav", (m / "photo.png").read_bytes()))),
        (400, lambda: post(files=swap("audio", "speech.wav", (m / "silent.wav").read_bytes()))),
        (413, lambda: post(files=swap("audio", "long.wav", (m / "long.wav").read_bytes()))),
        (400, lambda: post(files=swap("image", "../../../../evil.png", b"GIF89a not really"))),
        (400, lambda: post(files=swap("audio", "/etc/passwd", b"RIFF\x00\x00"))),
        (400, lambda: post(files={"audio": files["audio"]})),
        (400, lambda: post(files={"image": files["image"]})),
        (400, lambda: post(data={"size": SIZE})),
        (400, lambda: post(data={**data, "colour": "blue"})),
        (400, lambda: post(data={**data, "prompt": [PROMPT, "twice"]})),
        (400, lambda: post(files={"image": files["image"], "audio": files["audio"], "prompt": ("p.txt", b"x")})),
        (400, lambda: post(files={"audio": files["audio"]}, data={**data, "image": "photo.png"})),
        (400, lambda: post(data={**data, "seed": "abc"})),
        (400, lambda: post(data={**data, "seed": "-1"})),
        (400, lambda: post(data={**data, "num_clip": "0"})),
        (400, lambda: post(data={**data, "size": "huge"})),
        (400, lambda: post(data={**data, "size": "5000*5000"})),
        (400, lambda: post(data={**data, "prompt": "x" * 2001})),
        (415, lambda: c.post("/v1/jobs", json={"image": "photo.png", "audio": "speech.wav", "prompt": PROMPT})),
        (404, lambda: post(files={"audio": files["audio"]}, data={**data, "avatar": "av_" + "0" * 32})),
        (400, lambda: post(data={**data, "avatar": "av_" + "0" * 32})),  # both image and avatar
        (400, lambda: post(path="/v1/avatars", files={"image": ("x.png", b"not an image", "image/png")})),
        (400, lambda: post(path="/v1/avatars", files={"image": files["image"]}, data={"seed": "1"})),
        # ids and paths
        (404, lambda: c.get("/v1/jobs/..%2F..%2Fqueue.sqlite3")),
        (404, lambda: c.get("/v1/jobs/%2e%2e%2f%2e%2e%2fqueue.sqlite3/video")),
        (404, lambda: c.get(f"/v1/jobs/{job_id}/live/..%2F..%2F..%2Fqueue.sqlite3")),
        (404, lambda: c.get(f"/v1/jobs/{job_id}/live/video.mp4")),
        (404, lambda: c.get(f"/v1/jobs/{job_id}/live/.%2Fjournal.json")),
        (404, lambda: c.get(f"/v1/jobs/{job_id}/clips/-1")),
        (400, lambda: c.get(f"/v1/jobs/{job_id}/clips/abc")),
        (404, lambda: c.get("/v1/jobs/" + "0" * 32)),
        (404, lambda: c.get("/v1/jobs/DROP TABLE jobs")),
        (404, lambda: c.delete("/v1/jobs/" + job_id.upper())),
        (404, lambda: c.get("/v1/avatars/..%2Fblobs")),
        (404, lambda: c.get("/nothing/here")),
        (405, lambda: c.put("/v1/jobs")),
        (400, lambda: c.get("/v1/jobs", params={"limit": "100000"})),
        (400, lambda: c.get("/v1/jobs", params={"state": "exploded"})),
        (400, lambda: c.get("/v1/jobs", params={"limit": "many"})),
        (413, lambda: c.post("/v1/jobs", content=_oversize_chunked_body(), headers={
            "Content-Type": "multipart/form-data; boundary=xyz"})),  # no Content-Length: counted as it comes
        (408, lambda: c.post("/v1/jobs", content=_stalled_body(), headers={
            "Content-Type": "multipart/form-data; boundary=xyz"})),
        # finished and running jobs
        (409, lambda: c.delete(f"/v1/jobs/{short_job['id']}")),
    ]
    assert len(hostile) >= 30
    for i, (status, request) in enumerate(hostile):
        _one_line_error(request(), status)
        assert _snapshot(server) == before, f"hostile request {i} left something behind"
    assert not (server.state_dir.parent / "evil.png").exists() and not Path("/evil.png").exists()

    # a full queue: two jobs wait behind the paused one, the third gets 429 with Retry-After
    queued = [submit(server, media, seed=20 + i, num_clip=1) for i in range(2)]
    for unfinished in (job_id, queued[-1]):  # no video before a job is done
        _one_line_error(c.get(f"/v1/jobs/{unfinished}/video"), 409)
    before = _snapshot(server)
    r = post()
    _one_line_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1 and _snapshot(server) == before
    etas = [server.job(q)["eta_s"] for q in queued]  # from recent seconds per clip, counting the jobs ahead
    assert 0 < etas[0] < etas[1], etas
    # concurrent cancels of one queued job: exactly one wins, the others get 409
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: c.delete(f"/v1/jobs/{queued[0]}"), range(8)))
    assert sorted(r.status_code for r in results) == [200] + [409] * 7
    for r in results:
        if r.status_code == 409:
            _one_line_error(r, 409)
    assert c.delete(f"/v1/jobs/{queued[1]}").status_code == 200
    assert server.job(queued[0])["state"] == server.job(queued[1])["state"] == "cancelled"

def test_cancel_a_running_job(server: ServeProcess, media: Path) -> None:
    worker = server.worker_pid()
    job_id = submit(server, media, seed=9)
    until(lambda: server.job(job_id)["first_frame_s"] is not None, 300, "the first block")
    r = server.client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    _one_line_error(server.client.delete(f"/v1/jobs/{job_id}"), 409)  # already being cancelled
    job = server.wait_for(job_id, "cancelled", timeout=120)
    assert job["clips_done"] < 3 and job["video"] is None
    assert not (server.state_dir / "jobs" / job_id).exists()
    assert server.worker_pid() == worker  # stopped between blocks, not by killing the worker
    _one_line_error(server.client.delete(f"/v1/jobs/{job_id}"), 409)


def test_kill_9_mid_render_then_restart(server: ServeProcess, media: Path, clean_render: dict, short_job: dict,
                                        tmp_path: Path) -> None:
    """kill -9 of the server while a job renders; on restart the job finishes with the frames of an
    uninterrupted run, the queued job (made from a pre-encoded avatar) is not lost, finished
    results stay downloadable, and the worker did not outlive its server."""
    c = server.client
    r = c.post("/v1/avatars", files={"image": job_files(media)["image"]}, data={"size": SIZE, "prompt": PROMPT})
    assert r.status_code in (200, 201), r.text
    avatar = r.json()["id"]
    interrupted = submit(server, media, seed=7, num_clip=2)
    r = c.post("/v1/jobs", files={"audio": job_files(media)["audio"]},
               data={"avatar": avatar, "prompt": PROMPT, "seed": "8", "num_clip": "1"})
    assert r.status_code == 201, r.text
    waiting = r.json()["id"]
    before = _frames(server, short_job["id"], tmp_path)
    server.wait_for(interrupted, "running", clips_done=1)
    worker = server.worker_pid()
    server.kill()
    until(lambda: not process_alive(worker), 10, "the worker to die with its server (PR_SET_PDEATHSIG)")

    server.start()
    c = server.client
    assert server.job(waiting)["state"] in ("queued", "running", "done")
    job = server.wait_for(interrupted, "done")
    assert job["resumed"] and job["worker_deaths"] == 0  # a server crash is not the job's fault
    # 2 clips of seed 7 are the first 93 frames of the 3-clip CLI render (clips are causal; num_clip stops early)
    assert np.array_equal(_frames(server, interrupted, tmp_path), decoded_frames(clean_render["out"])[:93])
    telemetry = (server.state_dir / "jobs" / interrupted / "telemetry.jsonl").read_text()
    assert '"event": "resume"' in telemetry  # it continued from its checkpoint, not from scratch
    job = server.wait_for(waiting, "done")
    assert job["avatar"] == avatar and job["size"] == SIZE
    assert c.get(f"/v1/avatars/{avatar}").json()["state"] == "ready"
    # the avatar renders exactly as the photo it was made from, and the old result is still served
    assert np.array_equal(_frames(server, waiting, tmp_path), before)
    assert np.array_equal(_frames(server, short_job["id"], tmp_path), before)
    again = c.post("/v1/avatars", files={"image": job_files(media)["image"]}, data={"size": SIZE, "prompt": PROMPT})
    assert again.status_code == 200 and again.json()["id"] == avatar  # the same photo: the same avatar
    assert not list((server.state_dir / "tmp").iterdir())


def _running_after(server: ServeProcess, job_id: str, deaths: int) -> bool:
    job = server.job(job_id)
    return job["state"] == "running" and job["worker_deaths"] == deaths


def _metric(server: ServeProcess, series: str) -> float:
    """The value of one series (name and labels as printed) in a scrape of /metrics."""
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} is not in /metrics")


WORKER_DEATH_SERIES = ('liveavatar_worker_restarts{reason="worker_died"}',
                       'liveavatar_failures_total{kind="worker_died"}', 'liveavatar_jobs_total{state="failed"}')


def test_job_that_kills_its_worker_twice_fails(server: ServeProcess, media: Path) -> None:
    """Counts are compared with the test's start: a kill -9 test before it restarts the server (and
    its counters); another test may have killed workers too."""
    restarts = server.wait_ready()["worker"]["restarts"].get("worker_died", 0)
    counts = [_metric(server, s) for s in WORKER_DEATH_SERIES]
    job_id = submit(server, media, seed=10)
    for deaths in range(2):
        until(lambda d=deaths: _running_after(server, job_id, d), 300, f"the job to run after {deaths} worker deaths")
        pid = server.worker_pid()
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)
    job = server.wait_for(job_id, "failed", timeout=120)
    assert job["error_kind"] == "worker_died" and "SIGKILL" in job["error"] and "2 times" in job["error"]
    assert not (server.state_dir / "jobs" / job_id).exists()
    worker = server.wait_ready(300)["worker"]
    assert worker["pid"] != pid and worker["restarts"]["worker_died"] == restarts + 2  # a fresh worker
    # two restarts, two failures of kind worker_died (the retried one counted too), one failed job
    assert [_metric(server, s) - n for s, n in zip(WORKER_DEATH_SERIES, counts)] == [2, 2, 1]


def test_health_and_metrics(server: ServeProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"ok": True}  # no token needed to probe liveness
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and isinstance(ready.json()["worker"]["restarts"], dict)
    text = server.client.get("/metrics").text  # every series exists from the start, whatever ran before
    for name in ("liveavatar_queue_depth", "liveavatar_job_seconds_count", "liveavatar_clip_seconds_count",
                 "liveavatar_time_to_first_frame_seconds_count", "liveavatar_job_latency_seconds_count",
                 'liveavatar_host_memory_bytes{process="server"}', 'liveavatar_host_memory_bytes{process="worker"}',
                 'liveavatar_failures_total{kind="worker_died"}', 'liveavatar_jobs_total{state="done"}',
                 'liveavatar_jobs_total{state="failed"}', 'liveavatar_jobs_total{state="cancelled"}',
                 "liveavatar_worker_ready 1.0", 'liveavatar_worker_restarts{reason="worker_died"}'):
        assert name in text, name


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")  # Debian's packages
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1200,1400")


def _chromium(tmp_path: Path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium: `apt-get install chromium chromium-driver` (tools/setup.sh does it as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver or browser download


def test_page_in_chromium_uploads_shows_progress_and_plays(server: ServeProcess, media: Path,
                                                           tmp_path: Path) -> None:
    driver = _chromium(tmp_path)
    try:
        driver.get(server.url + "/")
        by_id = driver.find_element
        until(lambda: by_id("id", "auth").is_displayed(), 30, "the token prompt")  # the API said 401
        by_id("id", "token").send_keys(TOKEN)
        by_id("id", "save-token").click()
        by_id("id", "image").send_keys(str(media / "photo.png"))
        by_id("id", "audio").send_keys(str(media / "speech.wav"))
        driver.execute_script("document.querySelector('details').open = true")
        by_id("id", "size").send_keys(SIZE)
        by_id("id", "seed").send_keys("11")
        by_id("id", "num_clip").send_keys("2")
        by_id("id", "submit").click()
        until(lambda: by_id("id", "state").text == "done", 600, "the job to finish in the page")
        events = driver.execute_script("return window.__events")
        assert [e["state"] for e in events][-1] == "done" and "running" in [e["state"] for e in events]
        assert by_id("id", "clips").text == "2/2"
        assert float(by_id("id", "progress").get_attribute("value")) == 1.0
        # clip 0 played live while clip 1 rendered
        assert driver.execute_script("return document.getElementById('live').src").startswith("blob:")
        until(lambda: driver.execute_script("return document.getElementById('result').readyState >= 2"), 60,
               "the result video to load")
        driver.execute_script("const v = document.getElementById('result'); v.muted = true; v.play();")
        until(lambda: driver.execute_script("return document.getElementById('result').currentTime > 0.3"), 60,
               "the result video to play")
        video = driver.execute_script("const v = document.getElementById('result'); "
                                      "return [v.videoWidth, v.videoHeight, v.duration, v.error === null]")
        assert video[:2] == [64, 64] and video[2] == pytest.approx(93 / 25, abs=0.1) and video[3]
        link = by_id("id", "download")
        assert link.is_displayed() and link.get_attribute("href").startswith("blob:")
        assert driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 1000
    finally:
        driver.quit()
