"""Shared fixtures: the tiny real-layout checkpoint, the reference manifests, GPU/upstream skips."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # tools/ scripts are importable helpers for tests

torch.set_num_threads(min(2, torch.get_num_threads()))

# A suite started in the background by a non-interactive shell (`.ci/run &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored across exec: the Ctrl-C tests' children would never
# see it. Python's own handler here means the children start with SIGINT at its default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test, and every fixture first set up for it, starts from the same torch RNG state whatever
    ran before: the suite runs in random order (pytest-randomly reseeds `random` and numpy alike)."""
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001
    """The random order's seed, printed even with -q (which hides pytest-randomly's header line)."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and getattr(config.option, "randomly_reorganize", True):
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} (rerun it with -p randomly "
                                    f"--randomly-seed={seed}; file order with -p no:randomly)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference beside the repo (present in CI); tests that need it skip without it."""
    ref = REPO.parent / "shared" / "reference"
    if not (ref / "LIVEAVATAR.md").exists():
        pytest.skip(f"reference manifests not found at {ref} (they live in ../shared, outside the repo)")
    return ref


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random checkpoint in the upstream on-disk layout (PEFT-prefixed LoRA). Read-only."""
    from make_checkpoint import write_checkpoint

    return write_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_plain_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as `tiny_ckpt` but the LoRA spelled `X.lora_A.default.weight` and DiT only."""
    from make_checkpoint import write_checkpoint

    return write_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny_plain", seed=0, dit_only=True, lora_spelling="plain")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_ckpt` quantized to int8 with its LoRA: the artifact every render test uses. Read-only."""
    from liveavatar_lite.cli import main as cli_main

    out = tmp_path_factory.mktemp("artifact") / "art"
    rc = cli_main(["quantize", str(tiny_ckpt), str(out), "-q", "int8",
                   "--lora", str(tiny_ckpt / "liveavatar.safetensors"), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photo.png (160x120) and speech.wav (4.7 s: 3 clips) for renders; `media / "cache"` is their cache dir."""
    from media_fixtures import write_photo, write_speech

    root = tmp_path_factory.mktemp("media")
    write_photo(root / "photo.png")
    write_speech(root / "speech.wav", 4.7)
    return root


@pytest.fixture(scope="session")
def clean_render(tiny_artifact: Path, media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted render of 3 clips (seed 7) through the CLI, with telemetry and its wall time."""
    import subprocess
    import time

    from render_helpers import cli_command, generate_args, render_env

    root = tmp_path_factory.mktemp("clean")
    out, tel = root / "clean.mp4", root / "tel.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.run(cli_command(*generate_args(tiny_artifact, media, out, "--telemetry", str(tel))),
                          env=render_env(), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "telemetry": tel, "wall": wall, "stderr": proc.stderr}


@pytest.fixture(scope="session")
def dit_ckpt_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiT-only checkpoint in 2 shards with its LoRA (tests/quantize_fixtures.py). Read-only."""
    from quantize_fixtures import write_dit_checkpoint

    return write_dit_checkpoint(tmp_path_factory.mktemp("dit_ckpt") / "ck")


@pytest.fixture
def dit_ckpt(dit_ckpt_pristine: Path, tmp_path: Path) -> Path:
    """A private copy of `dit_ckpt_pristine` that the test may damage."""
    import shutil

    dst = tmp_path / "ck"
    shutil.copytree(dit_ckpt_pristine, dst)
    return dst


@pytest.fixture
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """$LIVEAVATAR_LITE_CACHE in the test's temp dir: crash logs and prompt caches stay there."""
    monkeypatch.setenv("LIVEAVATAR_LITE_CACHE", str(tmp_path / "lite-cache"))
    return tmp_path / "lite-cache"
