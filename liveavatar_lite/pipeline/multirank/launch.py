"""Starting the ranks: our own launcher (`generate --ranks N`), or one rank of a torchrun job.

`generate_multirank(request, N, gpus)` checks the rank count and the GPUs, then either

* runs as ONE rank when torchrun started this process (RANK / WORLD_SIZE / LOCAL_RANK are set;
  torchrun watches the processes and stops the others when one fails), or
* starts N processes itself (multiprocessing "forkserver"), each running `run_rank`, and watches them:
  when one exits badly, the others are stopped at once (they would fail anyway, their peer gone)
  and ONE line says which rank failed and why. A rank killed by a signal is named as the cause
  over the ranks that merely lost contact with it. Every child also exits by itself when this
  launcher dies (it polls the launcher's pid), so nothing is left running.

    result = generate_multirank(options, request, world_size=4, gpus=(0, 1, 2, 3))   # RenderResult
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import UserError, first_line
from ...runtime.stage_plan import RankRole, rank_roles
from ..request import PipelineOptions, RenderRequest, RenderResult
from .comm import PeerLostError, barrier, close_group, init_group
from .stage import RankContext

log = logging.getLogger(__name__)

# Longest wait on a live but silent peer (the coordinator encoding a long speech file, a rank
# writing a checkpoint of tens of GB). A dead peer is noticed at once, not after this.
RANK_TIMEOUT_S = 1800.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
REPORT_GRACE_S = 1.0  # after the first failure, how long the other ranks may still report theirs
RESUME_HINT = "rerun with --resume to continue from the last checkpoint"


class RankFailedError(UserError):
    """A rank of a multi-process render failed; the message names it (one line)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def rank_devices(world_size: int, gpus: Sequence[int] | None) -> tuple[torch.device, ...]:
    """Each rank's device: GPU gpus[r] (default: GPU r), or the CPU when there is no GPU.

    rank_devices(2, (0, 0))  # two ranks sharing GPU 0 (give each a --vram share)
    """
    if not torch.cuda.is_available():
        if gpus:
            raise UserError("--gpus: no CUDA GPU is visible here; leave it out to run the ranks as CPU processes")
        return (torch.device("cpu"),) * world_size
    count = torch.cuda.device_count()
    if gpus is None:
        if world_size > count:
            raise UserError(f"--ranks {world_size} but only {count} GPU(s) are visible; pass --gpus to place "
                            "several ranks on one GPU (and --vram to give each its share)")
        gpus = range(world_size)
    if len(gpus) != world_size:
        raise UserError(f"--gpus names {len(gpus)} GPU(s) for --ranks {world_size}; give one per rank")
    bad = [g for g in gpus if not 0 <= g < count]
    if bad:
        raise UserError(f"--gpus {bad[0]}: this machine has GPUs 0..{count - 1}")
    return tuple(torch.device("cuda", g) for g in gpus)


def contexts(options: PipelineOptions, request: RenderRequest, roles: tuple[RankRole, ...],
             devices: tuple[torch.device, ...]) -> tuple[RankContext, ...]:
    return tuple(RankContext(r, roles, options, request, dev, gpu_share=devices.count(dev))
                 for r, dev in enumerate(devices))


def generate_multirank(options: PipelineOptions, request: RenderRequest, world_size: int,
                       gpus: Sequence[int] | None = None, split: str = "auto") -> RenderResult | None:
    """Render `request` with a pipeline of `world_size` ranks split by `split` (steps, layers, or
    auto: the planner's choice on GPUs, the step split on CPU processes); the coordinator's
    RenderResult (None on the other ranks of a torchrun job)."""
    devices = rank_devices(world_size, gpus)
    roles = resolve_roles(options, request, world_size, split, devices)
    ctxs = contexts(options, request, roles, devices)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: be one rank
        started = int(os.environ["WORLD_SIZE"])
        if started != world_size:
            raise UserError(f"torchrun started {started} processes but --ranks is {world_size}")
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if rank != local:
            raise UserError("--ranks runs in one machine: use torchrun --nnodes 1 (--standalone)")
        _log_with_rank(rank)
        return run_rank(ctxs[rank])
    return _spawn_and_watch(ctxs)


def resolve_roles(options: PipelineOptions, request: RenderRequest, world_size: int, split: str,
                  devices: Sequence[torch.device]) -> tuple[RankRole, ...]:
    """Every rank's role. The layer split's ranges come from the planner's per-layer costs at the
    render's --size with a profile every rank resolves alike (--device-profile, else the GPU's named
    profile, else the rtx4090 figures): under torchrun each rank computes them itself. `auto` plans
    both splits where the ranks have GPUs (each within --vram, default the GPU's memory / ranks on
    it) and keeps the faster; CPU processes share the same cores, so there it keeps the step split."""
    from ...runtime.stage_plan import SPLITS

    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    on_gpu = devices[0].type == "cuda"
    if split == "steps" or (split == "auto" and not on_gpu):
        return rank_roles(world_size, request.sample.num_steps)
    from ...artifact.format import read_manifest
    from ...runtime.device_profiles import get_profile, known_profile
    from ...runtime.plan_inputs import Budget, manifest_unit_sizes, parse_size, plan_input
    from ...runtime.stage_plan import layer_split_roles, plan_split
    from ..memory import decoder_graph, physical_ram_bytes, plan_compile_mode

    m = read_manifest(options.artifact)
    inp = plan_input(m.dit, parse_size(request.size), m.quant.format, unit_sizes=manifest_unit_sizes(m),
                     sample=request.sample, decoder=decoder_graph(options.artifact, m))
    profile = get_profile(options.device_profile) if options.device_profile else None
    if profile is None and on_gpu:
        profile = known_profile(torch.cuda.get_device_name(devices[0]))
    if profile is None:
        log.info("the layer split is balanced with the rtx4090 figures (pass --device-profile for this GPU's)")
        profile = get_profile("rtx4090")
    # the run's KV dtype and kernels price the layers (the VRAM figure does not enter the balance)
    kernels = dict(kv_dtype=options.kv_dtype, compile=plan_compile_mode(options.compile_units, devices[0].type),
                   attention=options.attention, overlap_decode=options.overlap_decode)
    if split == "layers":
        return layer_split_roles(inp, profile, world_size, Budget(vram_bytes=0.0, **kernels))
    share = max(devices.count(d) for d in devices)
    vram = (options.vram_gb * 1e9 if options.vram_gb is not None
            else torch.cuda.get_device_properties(devices[0]).total_memory / share)
    ram = options.ram_gb * 1e9 if options.ram_gb else physical_ram_bytes()
    choice = plan_split(inp, Budget(vram_bytes=vram, ram_bytes=ram, **kernels), profile,
                        world_size, "auto")
    log.info("--split auto: %s, as %s", choice.split, choice.reason)
    return tuple(p.role for p in choice.plans)


def run_rank(ctx: RankContext, timeout_s: float = RANK_TIMEOUT_S) -> RenderResult | None:
    """One rank, start to end: join the group, do its part, meet the others at the end."""
    from .coordinator import run_coordinator
    from .layers import run_layer_rank
    from .stage import prepare_dit_rank, run_dit_rank

    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)  # pinned buffers and streams then belong to this GPU
    init_group(ctx.rank, ctx.world_size, timeout_s)
    try:
        if ctx.role.decodes:
            result = run_coordinator(ctx)
        elif ctx.role.layers is not None:  # --split layers
            run_layer_rank(ctx, prepare_dit_rank(ctx))
            result = None
        else:
            run_dit_rank(ctx, prepare_dit_rank(ctx))
            result = None
        barrier()  # the coordinator arrives after the mux; nobody leaves a peer mid-call
        return result
    finally:
        close_group()


# ------------------------------------------------------------------------------ our own launcher

def _spawn_and_watch(ctxs: tuple[RankContext, ...]) -> RenderResult:
    import multiprocessing as mp

    # forkserver: a clean server process (no threads, no CUDA) imports torch and this package
    # once; each rank is forked from it, so N ranks do not each pay the imports (spawn would).
    spawn = mp.get_context("forkserver")
    spawn.set_forkserver_preload(["liveavatar_lite.pipeline.multirank.coordinator",
                                  "liveavatar_lite.runtime.dit_runtime"])
    port = _free_port()
    level = logging.getLogger("liveavatar_lite").getEffectiveLevel()
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // len(ctxs))
    procs, reports = [], []
    for ctx in ctxs:
        # One pipe per rank for its report (a pipe, not a Queue: a killed rank leaves no
        # semaphore behind for the resource tracker to complain about).
        reader, writer = spawn.Pipe(duplex=False)
        p = spawn.Process(target=_child_main, name=f"rank{ctx.rank}",
                          args=(ctx, port, writer, level, os.getpid(), threads))
        p.start()
        writer.close()  # the rank holds the only writer
        log.info("rank %d (%s) on %s: pid %d", ctx.rank, ctx.role.label, ctx.device, p.pid)
        procs.append(p)
        reports.append(reader)
    try:
        return _watch(procs, reports, ctxs)
    except BaseException:
        _stop(procs)
        raise


def _watch(procs: list[Any], reports: Any, ctxs: tuple[RankContext, ...]) -> RenderResult:
    """Wait for every rank; on the first bad exit stop the rest and raise one clear error."""
    from multiprocessing.connection import wait

    got: list[tuple] = []
    while True:
        _drain(reports, got)
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        alive = [p for p in procs if p.exitcode is None]
        if failed or not alive:
            break
        wait([p.sentinel for p in alive], timeout=0.5)
    _drain(reports, got)  # what a rank sent just before it exited
    if not failed:
        done = [r for r in got if r[0] == "done" and r[1] == ctxs[-1].rank]
        if done:
            return done[0][2]
        failed = [procs[-1]]  # the coordinator exited 0 without a result: should not happen
    # Let the others report what they saw (one of them may be the cause), then stop them.
    deadline = time.monotonic() + REPORT_GRACE_S
    while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
        wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.1)
    died = {i for i, p in enumerate(procs) if p.exitcode not in (None, 0)}
    _stop(procs)
    _drain(reports, got, wait_s=0.5)
    message, code = _failure(procs, died, got, ctxs)
    raise RankFailedError(message, code)


def _failure(procs: list[Any], died: set[int], got: list[tuple], ctxs: tuple[RankContext, ...]) -> tuple[str, int]:
    """The one line that explains the failure: a rank's own error first, then a rank that died
    without a word (killed), then one that only lost its peer."""
    def who(rank: int) -> str:
        return f"rank {rank} ({ctxs[rank].role.label})"

    errors = [r for r in got if r[0] == "error"]
    if errors:
        _, rank, message, code = errors[0]
        hint = "" if code != 1 else f"; {RESUME_HINT}"
        return f"{who(rank)}: {message}{hint}", code
    reported = {r[1] for r in got}
    silent = [i for i in sorted(died) if i not in reported]
    if silent:
        code = procs[silent[0]].exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        return f"{who(silent[0])} {how}; the other ranks were stopped; {RESUME_HINT}", 1
    peers = [r for r in got if r[0] == "peer"]
    if peers:
        _, rank, message, _ = peers[0]
        return f"{who(rank)} lost another rank ({message}); {RESUME_HINT}", 1
    return f"a rank failed; {RESUME_HINT}", 1


def _drain(reports: list[Any], got: list[tuple], wait_s: float = 0.0) -> None:
    """Collect the reports that have arrived (waiting up to `wait_s` for late ones)."""
    deadline = time.monotonic() + wait_s
    while True:
        for reader in reports:
            try:
                while not reader.closed and reader.poll():
                    got.append(reader.recv())
            except (EOFError, OSError):  # the rank is gone and said all it had to say
                reader.close()
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def _stop(procs: list[Any]) -> None:
    """SIGTERM every live rank, SIGKILL what is left after a grace period."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_main(ctx: RankContext, port: int, reports: Any, level: int, launcher_pid: int,
                threads: int | None) -> None:
    """A spawned rank: torchrun's environment, logging with the rank, then `run_rank`; what went
    wrong goes to the launcher as (kind, rank, message, exit code)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(ctx.rank),
                      WORLD_SIZE=str(ctx.world_size), LOCAL_RANK=str(ctx.rank))
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("liveavatar_lite").setLevel(level)
    _log_with_rank(ctx.rank)
    _exit_with_launcher(launcher_pid)
    if threads:
        torch.set_num_threads(threads)
    # tqdm would make a multiprocessing lock (a named semaphore); a rank stopped by a signal could
    # not release it and the launcher's resource tracker would warn about the leak. A thread lock
    # does the same job inside one process.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    code = 0
    try:
        reports.send(("done", ctx.rank, run_rank(ctx)))
    except PeerLostError as e:
        reports.send(("peer", ctx.rank, str(e), 1))
        code = 1
    except UserError as e:
        reports.send(("error", ctx.rank, str(e), e.exit_code))
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001 (a bug: keep the traceback on this rank's stderr, report one line)
        import traceback

        traceback.print_exc()
        reports.send(("error", ctx.rank, f"{type(e).__name__}: {first_line(e)}", 1))
        code = 1
    finally:
        reports.close()
    sys.exit(code)


def _log_with_rank(rank: int) -> None:
    """Prefix this process's log lines with its rank."""
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter(f"%(levelname)s rank {rank} %(name)s: %(message)s"))


def _exit_with_launcher(launcher_pid: int) -> None:
    """End this rank when the launcher is gone (killed with SIGKILL, so it could not stop us).
    The launcher is not our parent (the fork server is), so it is probed by pid."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(launcher_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, owned by someone else (cannot happen for our launcher)
                pass

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
