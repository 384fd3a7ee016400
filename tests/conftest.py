"""Shared fixtures: the tiny real-layout checkpoint, the reference manifests, GPU/upstream skips."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # tools/ scripts are importable helpers for tests

torch.set_num_threads(min(2, torch.get_num_threads()))


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
