"""Soak benchmark of `liveavatar-lite serve` on the tiny model: many jobs through the HTTP API.

    python tools/bench_serve.py                       # 100 jobs; builds a tiny checkpoint + artifact in a temp dir
    python tools/bench_serve.py --jobs 20 --artifact /tmp/la-tiny/art

One server process (and its one worker) serves every job: 1 clip at 64*64, the same photo and
speech, seed = job number, submitted through POST /v1/jobs with up to --inflight jobs queued ahead
(OMP_NUM_THREADS=1 for the worker). Printed: failed jobs (must be 0), p50/p95 of the latency
(submit -> done), the render time and the time to first frame (task start -> first decoded frame,
and submit -> first frame), and the RSS of the server and of the worker after job 10 and after the
last job, both measured with the queue drained (the median of 5 samples 0.5 s apart; growth must stay within 1 %): VmRSS, and RssAnon
(anonymous memory only, where a leak shows; VmRSS also moves with shared-library pages the kernel
evicts under other processes' memory pressure). RssAnon every 10 jobs (not drained) shows the trend.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# beside this script (its sys.path[0]); importing it also puts tests/ and the repo on sys.path
from bench_pipeline import PROMPT, SIZE, _prepare

REPO = Path(__file__).resolve().parents[1]  # PYTHONPATH of the server it starts


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of `pid` in bytes: all resident pages, and the anonymous ones (heap, arenas).

    VmRSS also counts file-backed pages (torch's shared libraries, mapped files), which the kernel
    drops and re-reads under memory pressure from other processes; RssAnon is where a leak shows.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


def _settled_rss(pid: int, samples: int = 5, every_s: float = 0.5) -> tuple[int, int]:
    """The median (VmRSS, RssAnon) of a few samples taken `every_s` apart (one sample can catch a transient)."""
    taken = []
    for _ in range(samples):
        time.sleep(every_s)
        taken.append(_rss(pid))
    return (int(statistics.median(t[0] for t in taken)), int(statistics.median(t[1] for t in taken)))


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=100, help="jobs to run (default: %(default)s)")
    ap.add_argument("--inflight", type=int, default=2, help="jobs queued ahead of the one rendering")
    ap.add_argument("--baseline", type=int, default=10, help="the job after which the RSS baseline is taken")
    ap.add_argument("--artifact", type=Path, default=None, help="a tiny artifact (default: build one)")
    args = ap.parse_args()

    import httpx
    from serve_helpers import free_port

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        artifact, media = _prepare(work, args.artifact)
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "liveavatar_lite.cli", "serve", str(artifact), "--state-dir", str(work / "state"),
               "--port", str(port), "--size", SIZE, "--max-queue", str(args.inflight + 2),
               "--cache-dir", str(work / "cache")]
        log = open(work / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        files = {"image": ("photo.png", (media / "photo.png").read_bytes(), "image/png"),
                 "audio": ("speech.wav", (media / "speech.wav").read_bytes(), "audio/wav")}
        try:
            t0 = time.time()
            while True:
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.time() - t0 > 600:
                    raise SystemExit(f"the server did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            worker = ready.json()["worker"]["pid"]
            results, pending, submitted, rss, trend = [], [], 0, {}, []
            while len(results) < args.jobs:
                drain = submitted == args.baseline and len(results) < args.baseline  # baseline: queue empty
                while submitted < args.jobs and len(pending) <= args.inflight and not drain:
                    r = client.post("/v1/jobs", files=files,
                                    data={"prompt": PROMPT, "size": SIZE, "seed": str(submitted), "num_clip": "1"})
                    r.raise_for_status()
                    pending.append(r.json()["id"])
                    submitted += 1
                    drain = submitted == args.baseline
                job = client.get(f"/v1/jobs/{pending[0]}").json()
                if job["state"] in ("done", "failed", "cancelled"):
                    results.append(job)
                    pending.pop(0)
                    if len(results) % 10 == 0:  # the trend (not drained: a render may be running)
                        trend.append((len(results), _rss(server.pid)[1], _rss(worker)[1]))
                    if len(results) in (args.baseline, args.jobs) and not pending:
                        time.sleep(1.0)  # let the worker's Memory report and the server settle
                        rss[len(results)] = (_settled_rss(server.pid), _settled_rss(worker))
                    continue
                time.sleep(0.1)
            assert client.get("/readyz").json()["worker"]["pid"] == worker, "the worker was restarted"
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()

    failed = [j for j in results if j["state"] != "done"]
    latency = [j["finished"] - j["created"] for j in results if j["state"] == "done"]
    render = [j["render_s"] for j in results if j["state"] == "done"]
    ttff = [j["first_frame_s"] for j in results if j["state"] == "done"]
    submit_ttff = [j["started"] - j["created"] + j["first_frame_s"] for j in results if j["state"] == "done"]
    print(f"tiny model, {SIZE}, 1 clip per job, {args.jobs} jobs through the HTTP API, up to {args.inflight} "
          f"queued ahead; CPU ({os.cpu_count()} cores, OMP_NUM_THREADS=1)")
    print(f"failed jobs: {len(failed)}" + (f" ({failed[0]['error']})" if failed else ""))
    print(f"{'seconds':40s}{'p50':>8s}{'p95':>8s}")
    for name, values in (("latency (submit -> done)", latency), ("render (task start -> done)", render),
                         ("time to first frame (task start)", ttff), ("time to first frame (submit)", submit_ttff)):
        print(f"{name:40s}{_percentile(values, 50):8.2f}{_percentile(values, 95):8.2f}")
    print("RssAnon every 10 jobs, MB (server / worker): "
          + ", ".join(f"{n}: {s / 1e6:.1f} / {w / 1e6:.1f}" for n, s, w in trend))
    (s0, w0), (s1, w1) = rss[args.baseline], rss[args.jobs]
    for name, a, b in (("server", s0, s1), ("worker", w0, w1)):
        for i, kind in enumerate(("RSS", "RssAnon")):
            growth = (b[i] - a[i]) / a[i] * 100
            print(f"{kind:7s} {name}: {a[i] / 1e6:7.1f} MB after job {args.baseline}, {b[i] / 1e6:7.1f} MB after job "
                  f"{args.jobs} ({growth:+.2f} %, {'within' if abs(growth) <= 1 else 'OUTSIDE'} 1 %)")


if __name__ == "__main__":
    main()
