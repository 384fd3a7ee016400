"""A compressed week of a kiosk: many jobs, many faces, a full disk and stalled workers, on the tiny model.

    python tools/bench_serve_soak.py                          # 300 jobs, 150 faces (hours on a CPU)
    python tools/bench_serve_soak.py --jobs 60 --faces 30     # a reduced run

One `serve` process with `--max-state-gb`, `--stall-timeout` and `--min-free-mb`, jobs of one clip
at 64*64 submitted through the API with up to --inflight queued ahead; job i uses face i % faces
(a distinct photo: its own photo-cache entry) and seed i. Injected, early so the RSS baseline is
taken after them:
- two worker stalls (SIGSTOP of the worker while jobs --stall-at render): the watchdog kills and
  restarts it, the job resumes;
- one disk-full episode at job --disk-full-at: the job's next live segment is a symlink to
  /dev/full (a real ENOSPC) and the server's free-space probe reads 0 (its test hook) for
  --full-seconds; uploads meanwhile get 507 and are retried after.
Printed: jobs done / lost (must be 0), the 507s, the stalls caught, the state dir's size against the
limit (largest seen right after any job, largest of a sample every 0.5 s, and at the end), and the
RSS of the server and the (last) worker after job --baseline and after the last job, with the queue
drained (growth must stay within 1 %); every 20 jobs a trend line (one unsettled RSS sample).
--max-wall stops submitting after that many seconds (the queued jobs finish and are measured): the
run then reports the jobs it did, not --jobs.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# beside this script (its sys.path[0]); importing it also puts tests/ and the repo on sys.path
from bench_pipeline import PROMPT, SIZE, _prepare

REPO = Path(__file__).resolve().parents[1]  # PYTHONPATH of the server it starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--faces", type=int, default=150)
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--stall-at", type=int, nargs="*", default=[5, 15], help="jobs during which the worker stalls")
    ap.add_argument("--disk-full-at", type=int, default=10)
    ap.add_argument("--full-seconds", type=float, default=5.0)
    ap.add_argument("--baseline", type=int, default=30, help="the job after which the RSS baseline is taken")
    ap.add_argument("--max-state-gb", type=float, default=0.02)
    ap.add_argument("--stall-timeout", type=float, default=20.0)
    ap.add_argument("--keep-jobs", type=int, default=40, help="the server's --keep-jobs (results kept)")
    ap.add_argument("--max-wall", type=float, default=None,
                    help="stop submitting after this many seconds, finish the queued jobs and report what ran")
    ap.add_argument("--artifact", type=Path, default=None, help="a tiny artifact (default: build one)")
    args = ap.parse_args()

    import httpx
    from bench_serve import _settled_rss
    from media_fixtures import write_photo
    from serve_helpers import free_port

    from liveavatar_lite.serve.disk import FREE_BYTES_HOOK, tree_bytes

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        artifact, media = _prepare(work, args.artifact)
        faces = []
        (work / "faces").mkdir()
        for i in range(args.faces):  # distinct photos (size and so pixels differ): one cache entry each
            faces.append(write_photo(work / "faces" / f"face{i}.png", width=160 + 2 * (i % 40), height=120 + i // 40))
        speech = (media / "speech.wav").read_bytes()
        state, free_file = work / "state", work / "free_bytes"
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{FREE_BYTES_HOOK: str(free_file)})
        cmd = [sys.executable, "-m", "liveavatar_lite.cli", "serve", str(artifact), "--state-dir", str(state),
               "--port", str(port), "--size", SIZE, "--max-queue", str(args.inflight + 2), "--checkpoint-interval", "0",
               "--max-state-gb", str(args.max_state_gb), "--stall-timeout", str(args.stall_timeout),
               "--min-free-mb", "1", "--keep-jobs", str(args.keep_jobs)]
        log = open(work / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

        def ready(timeout: float = 900) -> dict:
            t0 = time.time()
            while time.time() - t0 < timeout:
                try:
                    r = client.get("/readyz")
                    if r.status_code == 200:
                        return r.json()
                except httpx.TransportError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            raise SystemExit("the server was not ready")

        t_start = time.time()
        refused, stalls, largest, done, filled = 0, 0, 0, {}, False
        largest_any, sampled = 0, 0.0  # the state dir's size at any moment (sampled each 0.5 s), not only after jobs
        try:
            ready()
            pending: list[tuple[int, str]] = []
            submitted = 0
            rss: dict[int, tuple] = {}
            while len(done) < args.jobs:
                if args.max_wall and time.time() - t_start > args.max_wall and submitted < args.jobs \
                        and submitted > args.baseline:
                    print(f"--max-wall {args.max_wall:.0f} s reached: {submitted} jobs submitted, no more", flush=True)
                    args.jobs = submitted  # the queued ones finish; the end sample is taken after the last
                if time.time() - sampled > 0.5:
                    largest_any, sampled = max(largest_any, tree_bytes(state)), time.time()
                drain = submitted >= args.baseline and len(done) < args.baseline
                while submitted < args.jobs and len(pending) <= args.inflight and not drain:
                    face = faces[submitted % args.faces]
                    r = client.post("/v1/jobs", files={"image": ("f.png", face.read_bytes(), "image/png"),
                                                       "audio": ("s.wav", speech, "audio/wav")},
                                    data={"prompt": PROMPT, "size": SIZE, "seed": str(submitted), "num_clip": "1"})
                    if r.status_code == 507:
                        refused += 1
                        break  # the disk is full: retried on a later pass
                    r.raise_for_status()
                    pending.append((submitted, r.json()["id"]))
                    submitted += 1
                    drain = submitted >= args.baseline and len(done) < args.baseline
                index, job_id = pending[0]
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] == "running" and job["progress"] > 0:
                    if index in args.stall_at and index not in done and job["worker_deaths"] == 0:
                        os.kill(client.get("/readyz").json()["worker"]["pid"], signal.SIGSTOP)
                        while client.get(f"/v1/jobs/{job_id}").json()["worker_deaths"] == 0:
                            time.sleep(0.2)
                        stalls += 1
                        print(f"job {index}: the stalled worker was caught and restarted", flush=True)
                    elif index == args.disk_full_at and not filled:
                        filled = True
                        _fill(client, state, job_id, free_file)
                        while client.get(f"/v1/jobs/{job_id}").json()["state"] == "running":
                            time.sleep(0.2)
                        print(f"job {index}: {client.get(f'/v1/jobs/{job_id}').json()['state']} on a full disk",
                              flush=True)
                        time.sleep(args.full_seconds)
                        for p in (state / "jobs" / job_id / "live").glob(".*.tmp"):
                            p.unlink(missing_ok=True)
                        free_file.unlink()
                if job["state"] in ("done", "failed", "cancelled"):
                    done[index] = job
                    pending.pop(0)
                    largest = max(largest, tree_bytes(state))
                    if len(done) % 20 == 0:  # a trend line: one RSS sample mid-run (jobs queued, not settled)
                        from bench_serve import _rss
                        wpid = client.get("/readyz").json()["worker"]["pid"]
                        print(f"{len(done)} jobs, {time.time() - t_start:.0f} s; state dir largest "
                              f"{largest_any / 1e6:.2f} MB; RSS server {_rss(server.pid)[0] / 1e6:.1f} MB, "
                              f"worker {_rss(wpid)[0] / 1e6:.1f} MB (pid {wpid})", flush=True)
                    if len(done) in (args.baseline, args.jobs) and not pending:
                        time.sleep(1.0)
                        worker = client.get("/readyz").json()["worker"]["pid"]
                        rss[len(done)] = (_settled_rss(server.pid), _settled_rss(worker), worker, _mappings(worker))
                    continue
                time.sleep(0.1)
            final_state = tree_bytes(state)
            restarts = client.get("/readyz").json()["worker"]["restarts"]
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()
        wall = time.time() - t_start
        text = (work / "server.log").read_text()

    lost = [i for i, j in done.items() if j["state"] != "done"]
    print(f"tiny model, {SIZE}, 1 clip per job, {args.jobs} jobs, {args.faces} faces, --max-state-gb "
          f"{args.max_state_gb}, --stall-timeout {args.stall_timeout}; {os.cpu_count()} cores; wall {wall:.0f} s")
    print(f"jobs done: {len(done) - len(lost)} of {args.jobs}; lost or failed: {len(lost)}"
          + (f" ({done[lost[0]]['error']})" if lost else ""))
    print(f"stalls injected and caught: {stalls} (worker restarts: {restarts}); 507s while the disk was full: "
          f"{refused}; waiting_for_disk log lines: {text.count(' waiting_for_disk ')}")
    print(f"state dir: largest after a job {largest / 1e6:.2f} MB, largest at any 0.5 s sample "
          f"{largest_any / 1e6:.2f} MB, at the end {final_state / 1e6:.2f} MB; limit {args.max_state_gb * 1e3:.0f} MB "
          f"(--keep-jobs {args.keep_jobs}); 'still holds' warnings: {text.count('still holds')}")
    (s0, w0, pid0, m0), (s1, w1, pid1, m1) = rss[args.baseline], rss[args.jobs]
    assert pid0 == pid1, "the worker was restarted after the baseline"
    for name, a, b in (("server", s0, s1), ("worker", w0, w1)):
        for i, kind in enumerate(("RSS", "RssAnon")):
            growth = (b[i] - a[i]) / a[i] * 100
            print(f"{kind:7s} {name}: {a[i] / 1e6:7.1f} MB after job {args.baseline}, {b[i] / 1e6:7.1f} MB after job "
                  f"{args.jobs} ({growth:+.2f} %, {'within' if abs(growth) <= 1 else 'OUTSIDE'} 1 %)")
    changes = sorted(((m1.get(k, 0) - m0.get(k, 0), k) for k in set(m0) | set(m1)), key=lambda c: -abs(c[0]))
    print("worker's resident kB by mapping, largest changes: "
          + ", ".join(f"{name} {kb:+d}" for kb, name in changes[:6]))


def _mappings(pid: int) -> dict[str, int]:
    """Resident kB of `pid` by what is mapped: a file's path, [heap], [stack], or [anon] (every
    anonymous mapping together: glibc's other arena, thread stacks, Python's object arenas)."""
    out: dict[str, int] = {}
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first, _, rest = line.partition(" ")
        if "-" in first and not first.endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            fields = rest.split(None, 4)
            name = fields[4].strip() if len(fields) > 4 else "[anon]"
        elif first == "Rss:":
            out[name] = out.get(name, 0) + int(rest.split()[0])
    return out


def _fill(client, state: Path, job_id: str, free_file: Path) -> None:
    """Fill the 'disk' under a running job: stop the worker, point its next live segments at
    /dev/full (a real ENOSPC), make the free-space probe read 0, go on."""
    worker = client.get("/readyz").json()["worker"]["pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        live = state / "jobs" / job_id / "live"
        live.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            if not (live / f"seg_{i:05d}.ts").exists():
                (live / f".seg_{i:05d}.ts.tmp").symlink_to("/dev/full")
        free_file.with_name("free.tmp").write_text("0")
        os.replace(free_file.with_name("free.tmp"), free_file)  # atomic: never read half-written
        while client.get("/readyz").status_code == 200:
            time.sleep(0.2)
    finally:
        os.kill(worker, signal.SIGCONT)


if __name__ == "__main__":
    main()
