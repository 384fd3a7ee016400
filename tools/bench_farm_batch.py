"""How fast `farm run` checks a batch file (`farm.jobs.read_jobs`): N lines over one photo and one speech file.

    .venv/bin/python tools/bench_farm_batch.py /tmp/farm25b 200000 --baseline /tmp/farm25base
    # source                       lines   wall s  lines/s (wall)   CPU s  lines per CPU-second  peak RSS MB (+read)
    # this tree                   200000     2.52          79,300    1.14               175,885  306 (+55)
    # baseline /tmp/farm25base    200000     6.28          31,844    2.84                70,431  409 (+155)
    # this tree / baseline: 2.5x per wall-second, 2.5x per CPU-second; the goal is 100,000 lines per second
    # (then the same for `plan_batch`, the ownership check `farm run` makes next: jobs per second)

Each source reads the same batch in a child process of its own, one after the other at whatever load
the machine has. A one-line batch is read first, not timed (the imports, the first decode); the timed
read decodes the photo and the speech once more (each read checks its inputs), a fixed cost that
small N shows. `--baseline SRC` is another source tree, e.g. `git archive deb1278 liveavatar_lite | tar -x -C
/tmp/base`. Peak RSS is the child's high-water mark; "+read" is how much it rose during the read (the
rows of the batch, the out index, the file buffer).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 100_000  # lines per second (issue 25)


def write_batch(root: Path, lines: int) -> Path:
    """root/jobs.jsonl: `lines` jobs over root/p.png and root/s.wav, each with its own out and seed."""
    sys.path.insert(0, str(REPO / "tests"))
    from media_fixtures import write_photo, write_speech

    root.mkdir(parents=True, exist_ok=True)
    write_photo(root / "p.png")
    write_speech(root / "s.wav", 2.0)
    job = {"image": "p.png", "audio": "s.wav", "prompt": "a person talking", "size": "64*64"}
    (root / "one.jsonl").write_text(json.dumps({**job, "out": "out/w.mp4"}) + "\n")
    with open(root / "jobs.jsonl", "w") as f:
        for i in range(lines):
            f.write(json.dumps({**job, "out": f"out/v{i}.mp4", "seed": i}) + "\n")
    return root / "jobs.jsonl"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(batch: Path) -> None:
    """Read `batch` with the liveavatar_lite on sys.path; print one JSON line of what it cost."""
    from liveavatar_lite.farm.jobs import JobDefaults, read_jobs

    read_jobs(batch.parent / "one.jsonl", JobDefaults())  # the imports and first uses: not timed
    before = _rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    jobs = read_jobs(batch, JobDefaults())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from liveavatar_lite.farm.jobs import plan_batch

    plan_wall, plan_cpu = time.perf_counter(), time.process_time()
    plan = plan_batch(jobs, "bench-identity", batch)  # what `farm run` does next: the ownership check
    plan_wall, plan_cpu = time.perf_counter() - plan_wall, time.process_time() - plan_cpu
    assert len(plan.todo) == len(jobs)
    print(json.dumps({"lines": len(jobs), "wall": wall, "cpu": cpu, "rss_before": before, "peak": peak,
                      "plan_wall": plan_wall, "plan_cpu": plan_cpu}))


def measure(batch: Path, source: Path) -> dict:
    """What reading `batch` costs with the liveavatar_lite of `source`, in a child process."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.run([sys.executable, __file__, "--child", str(batch)], env=env, cwd=source,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{source}: the read failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="where the batch, photo and speech are written")
    parser.add_argument("lines", type=int, nargs="?", default=200_000)
    parser.add_argument("--baseline", type=Path, help="another source tree to read the same batch with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.dir)
    batch = write_batch(args.dir, args.lines)
    sources = [("this tree", REPO)] + ([(f"baseline {args.baseline}", args.baseline)] if args.baseline else [])
    results = [(name, measure(batch, src)) for name, src in sources]
    width = max(len(name) for name, _ in results)
    print(f"{'source':{width}}  {'lines':>8}  {'wall s':>7}  {'lines/s (wall)':>14}  {'CPU s':>6}  "
          f"{'lines per CPU-second':>20}  peak RSS MB (+read)")
    for name, r in results:
        print(f"{name:{width}}  {r['lines']:>8}  {r['wall']:>7.2f}  {r['lines'] / r['wall']:>14,.0f}  "
              f"{r['cpu']:>6.2f}  {r['lines'] / r['cpu']:>20,.0f}  "
              f"{r['peak']:.0f} (+{r['peak'] - r['rss_before']:.0f})")
    print(f"\nplan_batch (the ownership check after validation: a key and the out's files per job)\n"
          f"{'source':{width}}  {'jobs':>8}  {'wall s':>7}  {'jobs/s (wall)':>14}  {'CPU s':>6}  {'jobs per CPU-second':>20}")
    for name, r in results:
        print(f"{name:{width}}  {r['lines']:>8}  {r['plan_wall']:>7.2f}  {r['lines'] / r['plan_wall']:>14,.0f}  "
              f"{r['plan_cpu']:>6.2f}  {r['lines'] / r['plan_cpu']:>20,.0f}")
    if len(results) == 2:
        (_, new), (_, old) = results
        print(f"this tree / baseline: validation {old['wall'] / new['wall']:.1f}x per wall-second, "
              f"{old['cpu'] / new['cpu']:.1f}x per CPU-second; plan_batch {old['plan_wall'] / new['plan_wall']:.1f}x "
              f"per wall-second, {old['plan_cpu'] / new['plan_cpu']:.1f}x per CPU-second; the goal is {GOAL:,} per second")


if __name__ == "__main__":
    main()
