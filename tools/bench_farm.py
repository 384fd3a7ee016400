"""Throughput of `farm run` on the tiny model: jobs per minute with 1 actor vs 2 actors, side by side.

    python tools/bench_farm.py                        # 8 jobs per run; builds a tiny checkpoint + artifact
    python tools/bench_farm.py --jobs 12 --artifact /tmp/la-tiny/art --rounds 2

One local Ray (`ray.init(num_cpus=2)`), CPU actors at one thread each. A warm-up job fills the
prompt and photo caches first, so both runs render from warm caches. Then, per round, the same
batch (1 clip at 64*64 each, seed = job number, fresh outputs) runs with 1 actor and with 2 actors.
Printed per run: wall seconds (actor start and model load included: a farm pays them once per
actor), seconds from the first job's start to the last job's end ("steady"), jobs per minute on
both clocks, and the 2-actor / 1-actor ratio. On a machine with 2 cores shared with other work the
ratio cannot reach 2: both actors and the driver compete for the same 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# beside this script (its sys.path[0]); importing it also puts tests/ and the repo on sys.path
from bench_pipeline import PROMPT, SIZE, _prepare


def _batch(root: Path, media: Path, jobs: int, first_seed: int) -> Path:
    root.mkdir(parents=True)
    path = root / "jobs.jsonl"
    path.write_text("".join(json.dumps({"image": str(media / "photo.png"), "audio": str(media / "speech.wav"),
                                        "prompt": PROMPT, "out": f"out/{i:03d}.mp4", "size": SIZE,
                                        "seed": first_seed + i, "num_clip": 1}) + "\n" for i in range(jobs)))
    return path


def _run(path: Path, artifact: Path, cache: Path, workers: int) -> dict:
    from liveavatar_lite.farm.actor import ActorSpec
    from liveavatar_lite.farm.batch import run_batch
    from liveavatar_lite.farm.cluster import ClusterConfig
    from liveavatar_lite.farm.executor import RayExecutor
    from liveavatar_lite.farm.jobs import JobDefaults, plan_batch, read_jobs
    from liveavatar_lite.pipeline.render import ArtifactBackend
    from liveavatar_lite.pipeline.request import PipelineOptions

    options = PipelineOptions(artifact, cache_dir=cache, progress=False)
    plan = plan_batch(read_jobs(path, JobDefaults()), ArtifactBackend.open(options).identity(), path)
    executor = RayExecutor(ActorSpec(options, (64, 64), threads=1), ClusterConfig(workers=workers))
    with open(os.devnull, "w") as quiet:
        summary = run_batch(plan, executor, checkpoint_interval_s=600, report=quiet)
    failed = summary.count("failed")
    if failed:
        raise SystemExit(f"{failed} job(s) failed: {[o.error for o in summary.outcomes if o.error][:1]}")
    return {"wall": summary.seconds, "steady": executor.busy_span(), "jobs": summary.count("done")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=8, help="jobs per run (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="1-actor and 2-actor runs, alternating (default: 1)")
    ap.add_argument("--artifact", type=Path, default=None, help="a tiny artifact (default: build one)")
    args = ap.parse_args()

    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-farm-") as tmp:
        work = Path(tmp)
        artifact, media = _prepare(work, args.artifact)
        cache = work / "cache"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            _run(_batch(work / "warmup", media, 1, 1000), artifact, cache, 1)  # fills the prompt + photo caches
            results: dict[int, list[dict]] = {1: [], 2: []}
            for r in range(args.rounds):
                for workers in (1, 2):
                    batch = _batch(work / f"round{r}-{workers}", media, args.jobs, 0)
                    results[workers].append(_run(batch, artifact, cache, workers))
                    print(f"round {r + 1}, {workers} actor(s): {results[workers][-1]['wall']:.1f} s", file=sys.stderr,
                          flush=True)
        finally:
            ray.shutdown()

    print(f"tiny model, {SIZE}, 1 clip per job, {args.jobs} jobs per run, {args.rounds} round(s); local Ray with "
          f"num_cpus=2 on {os.cpu_count()} cores, CPU actors at 1 thread each")
    print(f"{'actors':>6s} {'wall s':>8s} {'steady s':>9s} {'jobs/min (wall)':>16s} {'jobs/min (steady)':>18s}")
    per_min = {}
    for workers, runs in results.items():
        wall = sum(x["wall"] for x in runs)
        steady = sum(x["steady"] for x in runs)
        jobs = sum(x["jobs"] for x in runs)
        per_min[workers] = (jobs / wall * 60, jobs / steady * 60)
        print(f"{workers:6d} {wall:8.1f} {steady:9.1f} {per_min[workers][0]:16.2f} {per_min[workers][1]:18.2f}")
    print(f"2 actors / 1 actor: {per_min[2][0] / per_min[1][0]:.2f}x (wall), {per_min[2][1] / per_min[1][1]:.2f}x "
          "(steady)")


if __name__ == "__main__":
    main()
