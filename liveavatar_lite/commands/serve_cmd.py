"""`liveavatar-lite serve`: the kiosk service (HTTP API + durable queue + one warm worker)."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .farm_cmd import add_ray_flags
from .flags import (
    int_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from .generate_cmd import add_memory_flags

DESCRIPTION = (
    "Serve renders over HTTP for days: a durable job queue (SQLite under --state-dir) in front of one "
    "warm worker process that keeps the models loaded. Jobs survive a restart (a running one resumes "
    "from its checkpoint), progress streams as server-sent events, results download as mp4, and a page "
    "at / uploads, queues and plays. Binds to 127.0.0.1 unless given --host; any other address needs "
    "--token-file. See docs/serve.md."
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", type=Path, help="artifact directory from `liveavatar-lite quantize`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int_range(0, 65535), default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="queue, inputs, results and logs (default: $XDG_STATE_HOME/liveavatar-lite/serve, "
                             "else ~/.local/state/liveavatar-lite/serve)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="file whose first line is the bearer token clients must send; required unless the "
                             "host is loopback")
    add_memory_flags(parser)  # --vram, --ram, --kv: the worker's Pipeline, as for generate
    parser.add_argument("--size", default="704*384",
                        help="the size the worker is planned for and a job's default (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prompt and photo latent caches (default: STATE_DIR/cache)")
    parser.add_argument("--max-queue", type=positive_int, default=32,
                        help="jobs that may wait; more get 429 with Retry-After (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=50.0,
                        help="largest request body in MB (default: %(default)s)")
    parser.add_argument("--max-audio-seconds", type=positive_float, default=600.0,
                        help="longest speech a job may have (default: %(default)s)")
    parser.add_argument("--request-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="time to receive one upload (default: %(default)s)")
    parser.add_argument("--worker-memory-gb", type=positive_float, default=None, metavar="GB",
                        help="restart the worker when its RSS passes this (a job in flight resumes; default: off)")
    parser.add_argument("--recycle-after", type=non_negative_int, default=0, metavar="N",
                        help="restart the worker between jobs after N tasks (default: 0, never)")
    parser.add_argument("--checkpoint-interval", type=non_negative_float, default=600.0, metavar="SECONDS",
                        help="seconds between a job's resume checkpoints; 0 = after every clip (default: %(default)s)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="who renders: one local worker process (default), or Ray actors, one per GPU across "
                             "machines (needs the farm extra and a --state-dir on storage every node shares; "
                             "docs/farm.md)")
    add_ray_flags(parser, " (with --backend ray)")
    parser.add_argument("--keep-jobs", type=positive_int, default=1000,
                        help="finished jobs kept with their videos; older ones are deleted (default: %(default)s)")
    parser.add_argument("--max-state-gb", type=positive_float, default=None, metavar="GB",
                        help="keep the state dir under this: the live segments of finished jobs and the least "
                             "recently used photo and prompt caches are deleted first (default: no limit)")
    parser.add_argument("--min-free-mb", type=non_negative_float, default=1000.0, metavar="MB",
                        help="free disk the state dir keeps: below it (plus what a job writes) jobs wait and "
                             "uploads get 507 (default: %(default)s)")
    parser.add_argument("--stall-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                        help="a task without progress (a rendered block) for this long, or 10 of the plan's "
                             "block times if longer, has its worker restarted (default: %(default)s)")
    parser.add_argument("--session-idle", type=positive_float, default=120.0, metavar="SECONDS",
                        help="a talk session with no message from its client (or no client yet) for this long "
                             "ends (default: %(default)s)")
    parser.add_argument("--keep-sessions", action="store_true",
                        help="keep each talk session's frames, speech and the bytes sent under "
                             "STATE/sessions/<id>/ (debugging and tests; grows without limit)")
    parser.add_argument("--worker-log-mb", type=positive_float, default=20.0, metavar="MB",
                        help="worker.log past this is moved to worker.log.1 (one old copy kept) and emptied "
                             "(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Build the config at the edge, then serve until SIGTERM / Ctrl-C.

    liveavatar-lite serve la-int8/ --vram 24 --kv fp8 --state-dir /var/lib/liveavatar
    """
    from ..conditioning.photo import parse_size
    from ..errors import UserError
    from ..pipeline.render import ArtifactBackend
    from ..pipeline.request import PipelineOptions
    from ..serve.config import (
        Limits,
        ServeConfig,
        SessionPolicy,
        WorkerPolicy,
        default_state_dir,
        read_token,
    )
    from ..serve.server import serve

    parse_size(args.size)
    if args.backend == "local" and (args.ray_address or args.workers):
        raise UserError("--ray-address and --workers need --backend ray")
    state_dir = args.state_dir or default_state_dir()
    options = PipelineOptions(artifact=args.artifact, vram_gb=args.vram, ram_gb=args.ram, kv_dtype=args.kv,
                              cache_dir=args.cache_dir or state_dir / "cache", progress=False)
    if args.backend == "ray":  # actors run in other directories, on other machines: absolute paths
        state_dir = state_dir.resolve()
        options = replace(options, artifact=options.artifact.resolve(), cache_dir=Path(options.cache_dir).resolve())
    ArtifactBackend.open(options)  # a bad artifact fails here, in a second, not in the worker
    config = ServeConfig(
        pipeline=options, state_dir=state_dir, host=args.host, port=args.port,
        token=read_token(args.token_file) if args.token_file else None, size=args.size,
        limits=Limits(max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * 1e6),
                      max_audio_seconds=args.max_audio_seconds, request_timeout_s=args.request_timeout),
        worker=WorkerPolicy(memory_ceiling_bytes=int(args.worker_memory_gb * 1e9) if args.worker_memory_gb else None,
                            recycle_after_jobs=args.recycle_after, checkpoint_interval_s=args.checkpoint_interval,
                            stall_timeout_s=args.stall_timeout, log_max_bytes=int(args.worker_log_mb * 1e6)),
        sessions=SessionPolicy(idle_s=args.session_idle, keep=args.keep_sessions),
        keep_jobs=args.keep_jobs, max_state_bytes=int(args.max_state_gb * 1e9) if args.max_state_gb else None,
        min_free_bytes=int(args.min_free_mb * 1e6))
    serve(config, _ray_executor(args, config) if args.backend == "ray" else None)
    return 0


def _ray_executor(args: argparse.Namespace, config: object) -> object:
    """The farm's executor over Ray actors (imported here: serve never imports the farm)."""
    from ..farm.actor import ActorSpec
    from ..farm.cluster import ClusterConfig, import_ray
    from ..farm.executor import RayExecutor

    import_ray()  # one line if Ray is missing, before the server starts
    w, h = (int(x) for x in args.size.lower().replace("x", "*").split("*"))
    return RayExecutor(ActorSpec(config.pipeline, (w, h), cleanup="job_dir"),  # type: ignore[attr-defined]
                       ClusterConfig(address=args.ray_address, workers=args.workers,
                                     cpus_per_worker=args.cpus_per_worker))
