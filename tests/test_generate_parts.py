"""generate's small parts: the prompt-embedding cache, telemetry lines, the exact constant-video encode."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from liveavatar_lite.conditioning.caches import (
    PromptCache,
    default_cache_dir,
    prompt_key,
)
from liveavatar_lite.pipeline.telemetry import Telemetry, host_rss_bytes


def test_prompt_cache_computes_once_per_prompt_and_artifact(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    calls = []

    def encode() -> torch.Tensor:
        calls.append(1)
        return torch.arange(12, dtype=torch.float32).reshape(3, 4)

    a, hit = cache.get_or_compute("a man talking", "art1", encode)
    assert not hit and len(calls) == 1
    b, hit = cache.get_or_compute("a man talking", "art1", encode)
    assert hit and len(calls) == 1 and torch.equal(a, b)
    cache.get_or_compute("a man talking", "art2", encode)  # another artifact: its own entry
    cache.get_or_compute("a man talking ", "art1", encode)  # another prompt (exact text is the key)
    assert len(calls) == 3
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 3


def test_prompt_key_is_unambiguous() -> None:
    assert prompt_key("ab", "c") != prompt_key("a", "bc")
    assert len(prompt_key("x", "y")) == 64


def test_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    cache.put("p", "a", torch.ones(2, 2))
    cache.path("p", "a").write_bytes(b"garbage")
    value, hit = cache.get_or_compute("p", "a", lambda: torch.zeros(2, 2))
    assert not hit and torch.equal(value, torch.zeros(2, 2))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_cache_does_not_fail(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    os.chmod(tmp_path / "prompts", 0o500)
    try:
        value, hit = PromptCache(tmp_path).get_or_compute("p", "a", lambda: torch.ones(1, 2))
        assert not hit and value.shape == (1, 2)
    finally:
        os.chmod(tmp_path / "prompts", 0o700)


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVEAVATAR_LITE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIVEAVATAR_LITE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "liveavatar-lite"


def test_telemetry_lines_and_summary(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tel = Telemetry.open(path, append=False)
    tel.clip_done(0, frames=45, seconds=2.0, copy_wait_s=0.5)
    tel.clip_done(1, frames=48, seconds=2.0, copy_wait_s=None)
    summary = tel.summary(out="x.mp4")
    tel.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["clip", "clip", "summary"]
    assert lines[0]["copy_wait_fraction"] == 0.25 and lines[0]["fps"] == 22.5
    assert lines[1]["copy_wait_fraction"] is None
    assert summary["frames"] == 93 and summary["clips"] == 2 and summary["out"] == "x.mp4"
    assert summary["copy_wait_fraction"] == 0.125  # 0.5 s of 4 s measured clip time
    rss, peak = host_rss_bytes()
    if rss is not None:
        assert lines[0]["host_rss_bytes"] > 0 and peak >= rss
    resumed = Telemetry.open(path, append=True)  # a resumed render appends
    resumed.event("resume", clips_done=2)
    resumed.close()
    assert len(path.read_text().splitlines()) == 4


def test_constant_video_encode_is_exact() -> None:
    from liveavatar_lite.conditioning.photo import encode_constant_video
    from liveavatar_lite.config import PRESETS
    from liveavatar_lite.model.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(PRESETS["tiny"].vae).eval()
    for p in vae.parameters():
        p.data.normal_(0, 0.2)
    frame = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        fast = encode_constant_video(vae, frame, 5 * 73)
        full = vae.encode(frame.expand(-1, -1, 5 * 73, -1, -1))
        five = vae.encode(frame.expand(-1, -1, 5, -1, -1))
    assert fast.shape == (1, 16, 92, 4, 4)
    assert torch.equal(fast, full)  # bit-identical, not just close
    assert torch.equal(five[:, :, 1:], full[:, :, 1:2])  # the ref latent is a prefix of the motion encode


@pytest.mark.parametrize("flag,value,msg", [("--num-clip", "abc", "must be an integer from 1 to 1000000, got 'abc'"),
                                            ("--num-clip", "0", "must be an integer from 1 to 1000000, got '0'"),
                                            ("--vram", "lots", "must be a finite number > 0 and <= 1e+06, got 'lots'"),
                                            ("--vram", "nan", "must be a finite number > 0 and <= 1e+06, got 'nan'")])
def test_generate_flags_reject_non_positive_numbers(flag: str, value: str, msg: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from liveavatar_lite.commands import generate_cmd

    parser = argparse.ArgumentParser(prog="liveavatar-lite generate")
    generate_cmd.register(parser)
    required = ["--artifact", "a", "--image", "i.png", "--audio", "s.wav", "--prompt", "p", "-o", "o.mp4"]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*required, flag, value])
    assert exit_info.value.code == 2 and msg in capsys.readouterr().err
