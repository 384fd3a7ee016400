"""Several ranks end to end on CPU (gloo, tiny model): `generate --ranks N` as a user runs it.

2 ranks write the frames of one process; 4 ranks with a rank killed mid-render end with one line
and no rank left behind, and `--resume` finishes with identical frames. Two clips (93 frames)
each: the generator and the decoder are causal, so a render's first two clips are the same frames
whatever follows them, and the shared 3-clip one-process render (`clean_render`) is the reference.
The renders run with OMP_NUM_THREADS=1 (render_helpers), as every render they are compared with.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("soundfile")
pytest.importorskip("onnxruntime")

from media_fixtures import decoded_frames  # noqa: E402
from render_helpers import cli_command, generate_args, render_env  # noqa: E402

from liveavatar_lite.pipeline.workdir import RenderWorkDir  # noqa: E402


def test_two_ranks_write_the_frames_of_one_process(clean_render: dict, tiny_artifact: Path, media: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "ranks2.mp4"
    proc = subprocess.run(cli_command(*generate_args(tiny_artifact, media, out, "--num-clip", "2", "--ranks", "2")),
                          env=render_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 (steps 2-3 + decoder)" in proc.stderr
    assert np.array_equal(decoded_frames(out), decoded_frames(clean_render["out"])[:93])
    assert not RenderWorkDir.path_for(out).exists()


def test_four_ranks_a_rank_killed_then_resume_gives_identical_frames(clean_render: dict, tiny_artifact: Path,
                                                                     media: Path, tmp_path: Path) -> None:
    """4 ranks, one step each (the last also decodes). Clip 0 is written by the first run, clip 1
    by the resumed one: both are 4-rank frames, and they equal the one-process frames."""
    _kill_a_rank_then_resume(clean_render, tiny_artifact, media, tmp_path, ["--ranks", "4"],
                             "rank 1 (step 1) was killed by SIGKILL")


def _kill_a_rank_then_resume(clean_render: dict, tiny_artifact: Path, media: Path, tmp_path: Path,
                             extra: list[str], killed: str) -> None:
    """Render 2 clips with `extra`; once clip 0 and its checkpoint are durable kill rank 1 with
    SIGKILL: one line names it, no rank is left; `--resume` ends with the one-process frames."""
    out, log = tmp_path / "ranks.mp4", tmp_path / "stderr.txt"
    journal = RenderWorkDir.path_for(out) / "journal.json"
    args = cli_command(*generate_args(tiny_artifact, media, out, "--num-clip", "2", *extra))
    with log.open("w") as err:
        proc = subprocess.Popen(args, env=render_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads(journal.read_text())["segments"]) >= 1:
                    break  # clip 0 and its checkpoint (every rank's part) are durable
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the render finished before a rank could be killed"
        pids = {int(r): int(p) for r, p in re.findall(r"rank (\d) \(.*?\) on cpu: pid (\d+)", log.read_text())}
        assert sorted(pids) == [0, 1, 2, 3]
        os.kill(pids[1], signal.SIGKILL)  # a DiT rank in the middle of the pipeline
        rc = proc.wait(timeout=120)
    stderr = log.read_text()
    assert rc == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"liveavatar-lite generate: error: {killed}"), last
    assert "--resume" in last and "Traceback" not in stderr
    for pid in pids.values():  # no rank is left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not out.exists()
    resumed = subprocess.run([*args, "--resume"], env=render_env(), capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after 1 finished clips" in resumed.stderr or "resuming after 2 finished clips" in resumed.stderr
    assert np.array_equal(decoded_frames(out), decoded_frames(clean_render["out"])[:93])


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_write_the_frames_of_one_process(clean_render: dict, tiny_artifact: Path, media: Path,
                                                             tmp_path: Path) -> None:
    """Both ranks on GPU 0 (each planning within half its free memory); the reference render ran
    on the same GPU. The hand-off cost: tools/bench_ranks.py (docs/multi-gpu.md)."""
    out = tmp_path / "gpu_ranks2.mp4"
    args = generate_args(tiny_artifact, media, out, "--num-clip", "2", "--ranks", "2", "--gpus", "0,0")
    proc = subprocess.run(cli_command(*args), env=render_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(decoded_frames(out), decoded_frames(clean_render["out"])[:93])


# ------------------------------------------------------------------------------ --split layers

@pytest.mark.slow
@pytest.mark.parametrize("ranks,label", [(2, "rank 1 (layers 2-3 + decoder)"), (3, "rank 2 (layer 3 + decoder)")])
def test_layer_split_writes_the_frames_of_one_process(clean_render: dict, tiny_artifact: Path, media: Path,
                                                      tmp_path: Path, ranks: int, label: str) -> None:
    """Each rank a range of the tiny model's 4 layers for every step, items in wavefront order, the
    decoding rank with the fewest layers; two clips, the wave NOT cut at the clip boundary (no
    checkpoint due: items of clip 1 run while clip 0 finishes), the rings wrapped."""
    out = tmp_path / f"layers{ranks}.mp4"
    args = generate_args(tiny_artifact, media, out, "--num-clip", "2", "--ranks", str(ranks), "--split", "layers",
                         "--checkpoint-interval", "3600")
    proc = subprocess.run(cli_command(*args), env=render_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert label in proc.stderr
    assert np.array_equal(decoded_frames(out), decoded_frames(clean_render["out"])[:93])
    assert not RenderWorkDir.path_for(out).exists()


@pytest.mark.slow
def test_layer_split_four_ranks_a_rank_killed_then_resume_gives_identical_frames(
        clean_render: dict, tiny_artifact: Path, media: Path, tmp_path: Path) -> None:
    """4 layer ranks (one tiny layer each), a checkpoint after every clip (the wave cut there): clip 0
    by the first run, clip 1 by the resumed one, both equal to the one-process frames."""
    _kill_a_rank_then_resume(clean_render, tiny_artifact, media, tmp_path, ["--ranks", "4", "--split", "layers"],
                             "rank 1 (layer 1) was killed by SIGKILL")
