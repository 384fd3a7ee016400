"""Joining a Ray cluster (or starting a local one) and sizing the actors to it.

    cluster = Cluster.connect(ClusterConfig(address="10.0.0.1:6379"))   # UserError if unreachable
    cluster.workers, cluster.gpus_per_worker                             # one actor per GPU by default
    cluster.close()                                                      # shuts Ray down only if we started it

Without an address a local Ray starts with room for the asked-for workers (this machine's GPUs, or
CPU actors when it has none). A process that already called `ray.init` (a test, a notebook) keeps
its connection: the farm uses it and leaves it open.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import UserError, first_line

log = logging.getLogger(__name__)


def import_ray() -> Any:
    """The `ray` module, or a one-line UserError saying how to install it (it is the `farm` extra)."""
    try:
        import ray
    except ImportError:
        raise UserError("Ray is not installed: pip install 'liveavatar-lite[farm]' (or pip install ray)") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """UserError unless HOST:PORT accepts a TCP connection (Ray itself would retry for minutes)."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return  # Ray resolves these itself
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected HOST:PORT (the head's `ray start --head --port`), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or first_line(e)} (is "
                        "`ray start --head` running there, and the port open?)") from None


@dataclass(frozen=True)
class ClusterConfig:
    """Where the actors run and how many there are."""

    address: str | None = None  # a running cluster ("HOST:6379", "auto"); None: start a local Ray
    workers: int | None = None  # actors; None: one per GPU in the cluster (1 without GPUs)
    cpus_per_worker: float = 1.0  # each actor's CPU share (Ray sets its OMP_NUM_THREADS from it)


@dataclass
class Cluster:
    """A live connection: how many actors to start and what each one asks of Ray."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    started_here: bool  # we called ray.init (so we call ray.shutdown)

    @classmethod
    def connect(cls, config: ClusterConfig) -> Cluster:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            if config.address:
                check_reachable(config.address)
                try:
                    ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
                except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, a timeout: one line either way
                    raise UserError(f"cannot join the Ray cluster at {config.address}: {first_line(e)}") from None
            else:
                want = config.workers or 1
                ray.init(num_cpus=max(os.cpu_count() or 1, int(want * config.cpus_per_worker + 0.999)),
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            started = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        workers = config.workers or max(1, gpus)
        gpus_per_worker = 1.0 if gpus else 0.0
        log.info("Ray cluster: %d node(s), %d CPU, %d GPU; %d actor(s) with %s each", len(ray.nodes()),
                 int(resources.get("CPU", 0)), gpus, workers, f"1 GPU + {config.cpus_per_worker:g} CPU" if gpus
                 else f"{config.cpus_per_worker:g} CPU")
        if gpus and workers > gpus:
            log.warning("%d actors but %d GPUs: %d actor(s) wait until a GPU frees up", workers, gpus, workers - gpus)
        return cls(workers, gpus_per_worker, config.cpus_per_worker, started)

    def close(self) -> None:
        if self.started_here:
            import_ray().shutdown()
