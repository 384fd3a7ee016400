"""Several GPUs (or CPU processes) in one box: Live Avatar's denoising steps (or its layers) as a pipeline.

Each DiT rank owns whole denoising steps and only their KV rings (`runtime.stage_plan`), blocks
flow rank to rank (`comm.BlockLink`), the last rank decodes and runs the ordinary clip loop with
its crash-safe segments, journal and checkpoints (`coordinator`); `launch` starts and watches
the ranks, or joins a torchrun job. With `--split layers` each DiT rank holds a range of the
layers for every step instead and items (block, step) flow in wavefront order (`layers`).
docs/multi-gpu.md explains the design.

    from liveavatar_lite.pipeline.multirank import generate_multirank
    result = generate_multirank(options, request, world_size=4, gpus=(0, 1, 2, 3))
"""
from .launch import RankFailedError, generate_multirank

__all__ = ["RankFailedError", "generate_multirank"]
