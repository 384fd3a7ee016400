"""Crash safety: SIGKILL a real conversion mid-run, re-run, and get the uninterrupted run's bytes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from quantize_fixtures import write_dit_checkpoint

from liveavatar_lite.artifact.format import read_manifest
from liveavatar_lite.config import DiTConfig
from liveavatar_lite.errors import ArtifactError
from quantize.convert import JOB_FILE

# Big enough that one nf4 unit takes a noticeable time, small enough for a test (~20 MB bf16).
CFG = DiTConfig(dim=384, ffn_dim=1024, num_heads=3, num_layers=5, text_dim=64, audio_dim=32, audio_inject_layers=(0, 2, 4))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cmd(ck: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "liveavatar_lite.cli", "quantize", str(ck), str(out), "--format", "nf4",
            "--components", "dit", "--lora", str(ck / "liveavatar.safetensors"), "--no-progress"]


def _done(out: Path) -> int:
    try:
        return len(json.loads((out / JOB_FILE).read_text())["done"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    return write_dit_checkpoint(tmp_path_factory.mktemp("resume") / "ck", cfg=CFG, shards=3)


@pytest.fixture(scope="module")
def reference(ck, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "art"
    subprocess.run(_cmd(ck, out), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


@pytest.mark.parametrize("kill_after_files", [0, 2])
def test_sigkill_then_resume_is_byte_identical(ck, reference, tmp_path, kill_after_files):
    out = tmp_path / "art"
    proc = subprocess.Popen(_cmd(ck, out), env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    # kill_after_files=0: kill while the first unit's temp file is being written
    while time.monotonic() < deadline and proc.poll() is None:
        if _done(out) >= kill_after_files and any((out / "units").glob(".*.tmp")):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(ArtifactError):  # a half-written directory is never loadable
        read_manifest(out)
    assert _done(out) >= kill_after_files

    subprocess.run(_cmd(ck, out), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert _files(out) == _files(reference)


def test_corrupted_finished_unit_is_rewritten_on_resume(ck, reference, tmp_path):
    out = tmp_path / "art"
    subprocess.run(_cmd(ck, out), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    (out / "manifest.json").unlink()  # as if killed just before the manifest
    unit = out / "units/block_001.safetensors"
    raw = bytearray(unit.read_bytes())
    raw[-100] ^= 0x5A
    unit.write_bytes(bytes(raw))
    subprocess.run(_cmd(ck, out), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert _files(out) == _files(reference)


def test_sigint_then_rerun_is_byte_identical(ck, reference, tmp_path):
    """Ctrl-C mid-conversion: exit 130 with one line saying how to continue; the re-run gives the same bytes."""
    out = tmp_path / "art"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cmd(ck, out), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _done(out) < 1:
        time.sleep(0.005)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "liveavatar-lite quantize: interrupted (re-run the same command to resume: finished files are kept)"), err
    subprocess.run(_cmd(ck, out), check=True, env=env)
    assert _files(out) == _files(reference)
