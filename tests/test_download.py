"""`liveavatar-lite download`: the allow-list, and the command against local file trees (never the network).

The Hub is never contacted: huggingface_hub runs in offline mode with its endpoint pointed at a
closed local port, and the "remote" is a local folder that a stand-in snapshot_download copies from.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hostile_fixtures import assert_one_line, run_cli

from liveavatar_lite.artifact import download as dl

# What the two repositories hold besides the files we use (names as their Hub listings show them).
S2V_LISTING = [
    ".gitattributes", "README.md", "configuration.json", "config.json", "assets/logo.png", "examples/talk.wav",
    "examples/pose.mp4", "diffusion_pytorch_model-00001-of-00004.safetensors",
    "diffusion_pytorch_model-00002-of-00004.safetensors", "diffusion_pytorch_model-00003-of-00004.safetensors",
    "diffusion_pytorch_model-00004-of-00004.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/special_tokens_map.json",
    "google/umt5-xxl/spiece.model", "google/umt5-xxl/tokenizer.json", "google/umt5-xxl/tokenizer_config.json",
    "wav2vec2-large-xlsr-53-english/config.json", "wav2vec2-large-xlsr-53-english/preprocessor_config.json",
    "wav2vec2-large-xlsr-53-english/model.safetensors", "wav2vec2-large-xlsr-53-english/pytorch_model.bin",
    "wav2vec2-large-xlsr-53-english/vocab.json", "wav2vec2-large-xlsr-53-english/flax_model.msgpack",
]
LORA_LISTING = [".gitattributes", "README.md", "liveavatar.safetensors", "assets/demo.mp4"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # even a request that slipped through stays local
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("LIVEAVATAR_LITE_CACHE", str(tmp_path / "lite-cache"))


def test_allow_list_fetches_only_what_we_read() -> None:
    from huggingface_hub.utils import filter_repo_objects

    got = sorted(filter_repo_objects(S2V_LISTING, allow_patterns=list(dl.S2V.allow_patterns)))
    assert got == sorted(n for n in S2V_LISTING if not n.startswith(("assets/", "examples/", ".git", "README"))
                         and n not in ("configuration.json", "wav2vec2-large-xlsr-53-english/pytorch_model.bin",
                                       "wav2vec2-large-xlsr-53-english/flax_model.msgpack"))
    assert list(filter_repo_objects(LORA_LISTING, allow_patterns=list(dl.LORA.allow_patterns))) == ["liveavatar.safetensors"]
    assert dl.S2V.repo_id == "Wan-AI/Wan2.2-S2V-14B" and dl.LORA.repo_id == "Quark-Vision/Live-Avatar"


def _fake_hub(monkeypatch: pytest.MonkeyPatch, remote: dict[str, Path], fail_after: int | None = None) -> list[dict]:
    """snapshot_download stand-in: copies allow-listed files of a local 'remote' tree, skipping finished ones."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls: list[dict] = []

    def snapshot_download(repo_id: str, *, local_dir: Any, allow_patterns: list[str], revision: Any = None,
                          max_workers: int = 8, **_: Any) -> str:
        calls.append({"repo_id": repo_id, "local_dir": Path(local_dir), "allow": list(allow_patterns),
                      "revision": revision})
        root = remote[repo_id]
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        copied = 0
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            dst = Path(local_dir) / name
            if dst.exists() and dst.stat().st_size == (root / name).stat().st_size:
                continue  # finished earlier: not fetched again (what the Hub client does)
            if fail_after is not None and copied >= fail_after:
                raise huggingface_hub.errors.LocalEntryNotFoundError("connection lost")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, dst)
            copied += 1
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.fixture
def remote(tiny_ckpt: Path, tmp_path: Path) -> dict[str, Path]:
    s2v, lora = tmp_path / "remote-s2v", tmp_path / "remote-lora"
    shutil.copytree(tiny_ckpt, s2v, ignore=shutil.ignore_patterns("liveavatar.safetensors"))
    (s2v / "examples").mkdir()
    (s2v / "examples" / "big.mp4").write_bytes(b"\0" * 1000)  # not allow-listed: never fetched
    lora.mkdir()
    shutil.copy(tiny_ckpt / "liveavatar.safetensors", lora / "liveavatar.safetensors")
    return {dl.S2V.repo_id: s2v, dl.LORA.repo_id: lora}


def test_download_into_one_folder_then_quantize_finds_the_lora(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch, remote: dict,
                                                               tmp_path: Path) -> None:
    calls = _fake_hub(monkeypatch, remote)
    dest = tmp_path / "ckpt"
    code, err = run_cli(capsys, "download", dest, "--revision", "abc123")
    assert code == 0, err
    assert [(c["repo_id"], c["local_dir"], c["revision"]) for c in calls] == [
        (dl.S2V.repo_id, dest, "abc123"), (dl.LORA.repo_id, dest, None)]
    assert (dest / "liveavatar.safetensors").is_file() and not (dest / "examples").exists()
    assert dl.missing_files(dest) == []


def test_interrupted_download_resumes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                      remote: dict, tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    _fake_hub(monkeypatch, remote, fail_after=3)
    code, err = run_cli(capsys, "download", dest)
    assert_one_line(code, err, "cannot fetch Wan-AI/Wan2.2-S2V-14B", exit_code=2)
    assert "re-running resumes" in err
    first = {p.name for p in dest.rglob("*") if p.is_file()}
    calls = _fake_hub(monkeypatch, remote)
    assert run_cli(capsys, "download", dest)[0] == 0
    assert first and first <= {p.name for p in dest.rglob("*") if p.is_file()} and dl.missing_files(dest) == []
    assert len(calls) == 2


def test_offline_with_a_complete_local_tree(capsys: pytest.CaptureFixture[str], tiny_ckpt: Path,
                                            tmp_path: Path) -> None:
    """The real snapshot_download, offline: a complete folder is accepted as it is, nothing fetched."""
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dest)
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    code, err = run_cli(capsys, "download", dest)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p in before} == before


def test_offline_with_an_incomplete_local_tree(capsys: pytest.CaptureFixture[str], tiny_ckpt: Path,
                                               tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dest)
    (dest / "liveavatar.safetensors").unlink()
    (dest / "Wan2.1_VAE.pth").unlink()
    code, err = run_cli(capsys, "download", dest)
    assert_one_line(code, err, "is incomplete, it lacks Wan2.1_VAE.pth, liveavatar.safetensors", exit_code=2)


def test_offline_with_nothing_local(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "download", tmp_path / "ckpt")
    assert_one_line(code, err, "cannot fetch Wan-AI/Wan2.2-S2V-14B", exit_code=2)


def test_download_into_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    code, err = run_cli(capsys, "download", tmp_path / "f")
    assert_one_line(code, err, "not a folder to download into", exit_code=2)
