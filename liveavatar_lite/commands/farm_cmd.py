"""`liveavatar-lite farm run JOBS.jsonl --artifact ART`: a batch of renders over Ray actors (docs/farm.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import non_negative_float, positive_float, positive_int, seed
from .generate_cmd import add_memory_flags

DESCRIPTION = (
    "Render many videos on a Ray cluster: one actor per GPU (across machines), each keeping the models "
    "loaded. `farm run JOBS.jsonl` takes one JSON object per line (image, audio, prompt, out; optional "
    "size, seed, num_clip; relative paths are relative to the file). Without --ray-address it starts a "
    "local Ray with --workers actors. Safe to run again: finished jobs are skipped, unfinished ones "
    "resume from their checkpoints; a job whose actor dies resumes on another one. Needs the farm extra "
    "(pip install 'liveavatar-lite[farm]'). See docs/farm.md."
)


def add_ray_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--ray-address, --workers, --cpus-per-worker (farm run, serve --backend ray)."""
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help=f"a running Ray cluster (HOST:6379, or `auto`); default: start a local Ray{what}")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="actors, each holding a warm Pipeline (default: one per GPU in the cluster, 1 without GPUs)")
    parser.add_argument("--cpus-per-worker", type=positive_float, default=1.0, metavar="N",
                        help="CPUs Ray reserves for each actor; its CPU threads (default: %(default)s)")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="farm_command", metavar="ACTION")
    p = sub.add_parser("run", help="render every job of a JSON-lines file (skipping finished ones)",
                       description=DESCRIPTION)
    p.add_argument("jobs", type=Path, help="JSON lines: {\"image\", \"audio\", \"prompt\", \"out\", "
                                           "optional \"size\", \"seed\", \"num_clip\"}")
    p.add_argument("--artifact", required=True, type=Path,
                   help="artifact directory from `liveavatar-lite quantize` (on shared storage, or the same path "
                        "on every node)")
    add_ray_flags(p, "")
    add_memory_flags(p)  # each actor's --vram, --ram, --kv
    p.add_argument("--size", default="704*384", help="size of jobs that do not give one (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=42, help="seed of jobs that do not give one (default: %(default)s)")
    p.add_argument("--checkpoint-interval", type=non_negative_float, default=600.0, metavar="SECONDS",
                   help="seconds between a job's resume checkpoints (what a dead actor's job resumes from); "
                        "0 = after every clip (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="prompt and photo caches of the actors (default: each node's ~/.cache/liveavatar-lite)")


def run(args: argparse.Namespace) -> int:
    """Read and check the batch (before any Ray start), then render what is not finished.

    liveavatar-lite farm run jobs.jsonl --artifact /shared/la-int8 --ray-address head:6379
    """
    import sys

    from ..errors import UserError
    from ..farm.actor import ActorSpec
    from ..farm.batch import run_batch
    from ..farm.cluster import ClusterConfig, import_ray
    from ..farm.executor import RayExecutor
    from ..farm.jobs import JobDefaults, plan_batch, read_jobs
    from ..pipeline.render import ArtifactBackend
    from ..pipeline.request import PipelineOptions

    if args.farm_command != "run":
        raise UserError("farm needs an action: farm run JOBS.jsonl --artifact ART (see farm run --help)")
    options = PipelineOptions(artifact=args.artifact.resolve(), vram_gb=args.vram, ram_gb=args.ram,
                              kv_dtype=args.kv, cache_dir=args.cache_dir.resolve() if args.cache_dir else None,
                              progress=False)
    identity = ArtifactBackend.open(options).identity()  # a bad artifact fails here, before Ray starts
    jobs = read_jobs(args.jobs, JobDefaults(size=args.size, seed=args.seed))
    plan = plan_batch(jobs, identity, args.jobs)
    print(f"{args.jobs}: {len(jobs)} jobs, {len(plan.done)} already finished, {len(plan.todo)} to render"
          + (f" ({len(plan.resuming)} resuming)" if plan.resuming else ""), file=sys.stderr, flush=True)
    if plan.todo:
        import_ray()  # one line if Ray is missing, before anything starts
    largest = max(plan.todo or jobs, key=lambda j: j.width * j.height)  # the actors are planned for it
    executor = RayExecutor(ActorSpec(options, (largest.width, largest.height), cleanup="work_dir"),
                           ClusterConfig(address=args.ray_address, workers=args.workers,
                                         cpus_per_worker=args.cpus_per_worker))
    summary = run_batch(plan, executor, checkpoint_interval_s=args.checkpoint_interval)  # nothing to do: no Ray
    for outcome in summary.outcomes:
        if outcome.state == "failed":
            print(f"failed: {args.jobs}:{outcome.job.line} {outcome.job.out}: {outcome.error}", file=sys.stderr)
    print(summary.line())
    return 1 if summary.count("failed") else 0
