"""`liveavatar-lite eval`: settings syntax, the metrics, the lip-sync proxy on a drawn mouth, rankings,
end-to-end renders of the tiny artifact (identical settings, a KV sweep, perturbed candidates), bad input.

Renders are one clip at 64*64 (the tiny random model); the lip-sync and metric tests are numpy only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_fixtures import assert_one_line, run_cli
from render_helpers import PROMPT, SIZE, cli_command, render_env

from liveavatar_lite.errors import UserError
from liveavatar_lite.evaluate import metrics as M
from liveavatar_lite.evaluate.settings import EvalSetting, parse_setting, with_kv_sweep

# ------------------------------------------------------------------------------------------ settings


def test_settings_syntax_maps_each_key_onto_pipeline_options() -> None:
    s = parse_setting("/a:b/la-int8:kv=fp8,compile=on,vram=24,ram=64,profile=rtx4090")
    assert s.artifact == Path("/a:b/la-int8")  # only the last colon followed by key=value splits
    opts = s.options({"vram_gb": None, "ram_gb": None, "device_profile": None})
    assert opts == {"kv_dtype": "fp8", "compile_units": "on", "vram_gb": 24.0, "ram_gb": 64.0,
                    "device_profile": "rtx4090"}
    assert s.label == "la-int8:kv=fp8,compile=on,vram=24,ram=64,profile=rtx4090"
    plain = parse_setting("dir:with:colons")
    assert plain.artifact == Path("dir:with:colons") and plain.values == () and plain.get("kv") == "bf16"
    assert parse_setting("art:compile=off").options({})["compile_units"] == "off"
    assert parse_setting("art:attention=math").options({}) == {"attention": "math"}


def test_eval_help_names_every_setting_key() -> None:
    from liveavatar_lite.commands.eval_cmd import DESCRIPTION
    from liveavatar_lite.evaluate.settings import ATTENTION_CHOICES, KEYS

    for key in KEYS:
        assert any(f" {key}{end}" in DESCRIPTION for end in (" (", ",", ".")), key
    assert "|".join(ATTENTION_CHOICES) in DESCRIPTION


@pytest.mark.parametrize("text, match", [
    ("art:kv=fp16", "kv='fp16' must be one of bf16, fp8, int8"),
    ("art:speed=1", "unknown setting 'speed'"),
    ("art:vram=-3", "a finite number of GB > 0"),
    ("art:kv=fp8,kv=int8", "kv is given twice"),
    ("art:compile=maybe", "compile='maybe' must be one of auto, on, off"),
    ("art:attention=fast", "attention='fast' must be one of auto, sdpa"),
    ("", "empty"),
])
def test_bad_settings_are_one_line_errors(text: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        parse_setting(text)


def test_kv_sweep_crosses_candidates_and_refuses_a_clash() -> None:
    ref = parse_setting("ref:kv=int8")
    swept = with_kv_sweep((), ref, ("bf16", "fp8"))
    assert [s.spec for s in swept] == ["ref:kv=bf16", "ref:kv=fp8"]
    two = with_kv_sweep((parse_setting("a"), parse_setting("b:compile=on")), ref, ("int8",))
    assert [s.label for s in two] == ["a:kv=int8", "b:compile=on,kv=int8"]
    with pytest.raises(UserError, match="sets kv and --kv sweeps it"):
        with_kv_sweep((parse_setting("a:kv=fp8"),), ref, ("int8",))


# ------------------------------------------------------------------------------------------ metrics


def test_identical_frames_and_latents_give_infinite_psnr_and_zero_rel_l2() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    lat = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    assert M.psnr_db(float(M.frame_mse(frames, frames).mean())) == math.inf
    assert M.rel_l2(lat, lat) == 0.0
    assert np.all(M.ssim_luma(frames, frames) > 1 - 1e-6)
    assert M.flicker_ratio(M.diff_energy(frames)[0], M.diff_energy(frames)[0]) == 1.0
    # one level of difference everywhere: mse 1 -> PSNR = 20 log10(255)
    assert M.psnr_db(float(M.frame_mse(frames // 2, frames // 2 + 1).mean())) == pytest.approx(20 * math.log10(255))
    assert M.rel_l2(lat, lat * 1.01) == pytest.approx(0.01, rel=1e-5)


def test_drift_colour_shift_grows_with_a_colour_cast() -> None:
    photo = np.full((64, 64, 3), 120, np.uint8)
    shifts = [float(np.linalg.norm(M.colour_mean((photo.astype(int) + [k, 0, -k])[None].clip(0, 255).astype(np.uint8))
                                   - M.colour_mean(photo[None]))) for k in (0, 5, 20)]
    assert shifts[0] == 0 and shifts[0] < shifts[1] < shifts[2]
    assert shifts[2] == pytest.approx(20 * math.sqrt(2))
    box = M.face_box(64, 64)
    textured = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    same = M.face_similarity(textured[None], textured, box)
    other = M.face_similarity(np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), textured, box)
    assert same > 1 - 1e-6 and other < 0.2


# ------------------------------------------------------------------------------------------ lip-sync

FPS, RATE = 25, 16000


def syllable_speech(seconds: float, seed: int) -> np.ndarray:
    """Voiced 'syllables' of random length (0.08-0.3 s) and random gaps under a 140 Hz voice, 16 kHz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    env = np.zeros(n)
    t = 0.1
    while t < seconds - 0.4:
        dur = rng.uniform(0.08, 0.3)
        a, b = int(t * RATE), int((t + dur) * RATE)
        env[a:b] = np.hanning(b - a) * rng.uniform(0.4, 1.0)
        t += dur + rng.uniform(0.03, 0.35)
    time = np.arange(n) / RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * time) / k for k in range(1, 6))
    return (0.3 * env * voice).astype(np.float32)


def talking_mouth(envelope: np.ndarray, size: int = 128) -> np.ndarray:
    """Frames of a flat 'face' with a dark ellipse in `mouth_box` whose height follows `envelope`
    (normalised to its peak); drawn 4x supersampled so its area changes smoothly."""
    box = M.mouth_box(size, size)
    cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
    half_w, max_half_h = (box.x1 - box.x0) / 2 - 1, (box.y1 - box.y0) / 2 - 1
    ss = 4
    yy, xx = np.mgrid[0:size * ss, 0:size * ss] / ss + 0.5 / ss
    frames = np.empty((len(envelope), size, size, 3), np.uint8)
    peak = float(envelope.max()) or 1.0
    for t, e in enumerate(envelope):
        half_h = 0.3 + max_half_h * e / peak
        inside = ((yy - cy) / half_h) ** 2 + ((xx - cx) / half_w) ** 2 < 1
        cover = inside.reshape(size, ss, size, ss).mean(axis=(1, 3))
        frames[t] = np.rint(190 - 150 * cover)[..., None].astype(np.uint8)
    return frames


def test_lipsync_proxy_is_higher_for_the_matching_speech_than_a_shifted_or_foreign_one() -> None:
    seconds = 8.0
    frames_n = int(seconds * FPS)
    speech = syllable_speech(seconds, seed=3)
    video = talking_mouth(M.speech_envelope(speech, frames_n, RATE, FPS))
    motion = M.mouth_motion(video, M.mouth_box(128, 128))

    def proxy(wave: np.ndarray) -> float:
        value = M.lipsync_proxy(motion, M.envelope_motion(M.speech_envelope(wave, frames_n, RATE, FPS)))
        assert value is not None
        return value

    matching = proxy(speech)
    shifted = proxy(np.concatenate([np.zeros(int(0.4 * RATE), np.float32), speech])[: len(speech)])  # 10 frames late
    foreign = proxy(syllable_speech(seconds, seed=11))
    assert matching > 0.8, matching
    assert matching - max(shifted, foreign) > 0.3, (matching, shifted, foreign)
    # a frozen mouth has no correlation to report
    assert M.lipsync_proxy(np.zeros(frames_n), M.envelope_motion(M.speech_envelope(speech, frames_n))) is None


# ------------------------------------------------------------------------------------------ renders


@pytest.fixture(scope="module")
def eval_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photo.png and 1.5 s of speech (one clip); `cache/` is their prompt/photo cache."""
    from media_fixtures import write_photo, write_speech

    root = tmp_path_factory.mktemp("eval_media")
    write_photo(root / "photo.png")
    write_speech(root / "speech.wav", 1.5)
    return root


def eval_args(art: Path, media: Path, *extra: str) -> list[str]:
    return ["eval", "--reference", str(art), "--image", str(media / "photo.png"), "--audio", str(media / "speech.wav"),
            "--prompt", PROMPT, "--size", SIZE, "--num-clip", "1", "--seed", "3",
            "--cache-dir", str(media / "cache"), "--no-progress", *extra]


@pytest.mark.slow
def test_identical_settings_give_inf_psnr_and_a_kv_sweep_gives_one_table(tiny_artifact: Path, eval_media: Path,
                                                                         tmp_path: Path) -> None:
    """`--candidate ART --kv bf16,int8`: the bf16 row is the reference itself (PSNR inf, rel L2 0), the
    int8 row is close but not equal; --out gets the report, the drift plot, sheets and side-by-side mp4s."""
    out = tmp_path / "ev"
    proc = subprocess.run(cli_command(*eval_args(tiny_artifact, eval_media, "--candidate", str(tiny_artifact),
                                                 "--kv", "bf16,int8", "--out", str(out), "--json")),
                          env=render_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "report.json").read_text())
    same, kv8 = report["candidates"]
    assert same["label"] == "art:kv=bf16" and kv8["label"] == "art:kv=int8"
    o = same["overall"]
    assert o["psnr_db"] == "inf" and o["psnr_min_db"] == "inf" and o["latent_rel_l2"] == 0
    assert o["ssim"] == pytest.approx(1.0, abs=1e-6) and o["flicker_ratio"] == 1.0
    assert o["lipsync"] == report["reference"]["lipsync"] and same["rank"] == 1
    o8 = kv8["overall"]
    assert 0 < o8["latent_rel_l2"] < 0.1 and 30 < o8["psnr_db"] < math.inf and kv8["rank"] == 2
    assert len(same["clips"]) == 1 and same["clips"][0]["clip"] == 0
    for c in report["candidates"]:
        assert c["speed"]["s_per_clip"] > 0 and c["speed"]["peak_host_bytes"] > 0
        sheet, video = Path(c["files"]["contact_sheet"]), Path(c["files"]["side_by_side"])
        assert sheet.stat().st_size > 0 and video.stat().st_size > 0
    from media_fixtures import decoded_frames
    from PIL import Image

    frames = decoded_frames(Path(same["files"]["side_by_side"]))
    assert frames.shape == (45, 64, 128, 3)  # reference | candidate
    assert Image.open(out / "drift.png").size[0] == 900
    assert not list(out.glob(".eval-work-*")) and not list(out.rglob("*.tmp"))  # work dir and temp files gone


class _NoisyGenerator:
    """The real generator, with Gaussian noise of `sigma` added to each block's latents before decoding."""

    def __init__(self, inner: Any, sigma: float) -> None:
        import torch

        self.inner, self.sigma, self.rng = inner, sigma, torch.Generator().manual_seed(5)

    def next_block(self) -> Any:
        import torch

        out = self.inner.next_block()
        noise = torch.randn(out.latents.shape, generator=self.rng)
        return dataclasses.replace(out, latents=out.latents + self.sigma * noise.to(out.latents.dtype))


class _NoisyBackend:
    def __init__(self, inner: Any, sigma: float) -> None:
        self.inner, self.sigma = inner, sigma

    def load(self, size: tuple[int, int]) -> None:
        self.inner.load(size)

    def build(self, inputs: Any) -> Any:
        r = self.inner.build(inputs)  # the real renderer (its block loop and decode overlap), noisier blocks
        r.generator = _NoisyGenerator(r.generator, self.sigma)
        return r


@pytest.mark.slow
def test_a_heavier_perturbation_ranks_worse_than_a_lighter_one(tiny_artifact: Path, eval_media: Path) -> None:
    from liveavatar_lite.evaluate.report import format_table
    from liveavatar_lite.evaluate.run import EvalJob, evaluate
    from liveavatar_lite.pipeline.render import ArtifactBackend

    sigmas = {0: 0.0, 1: 0.3, 2: 0.03}  # reference, heavy, light: the heavy one is listed first
    job = EvalJob(reference=parse_setting(str(tiny_artifact)),
                  candidates=(EvalSetting(tiny_artifact), EvalSetting(tiny_artifact)),
                  image=eval_media / "photo.png", audio=eval_media / "speech.wav", prompt=PROMPT, size=SIZE,
                  num_clip=1, seed=3, cache_dir=eval_media / "cache", progress=False)
    report = evaluate(job, backends=lambda i, s, opts: _NoisyBackend(ArtifactBackend.open(opts), sigmas[i]))
    heavy, light = (c["overall"] for c in report["candidates"])
    assert report["candidates"][0]["rank"] == 2 and report["candidates"][1]["rank"] == 1
    assert heavy["latent_rel_l2"] > 3 * light["latent_rel_l2"] > 0
    assert heavy["psnr_db"] < light["psnr_db"] and heavy["ssim"] < light["ssim"] < 1
    assert heavy["psnr_min_db"] < light["psnr_min_db"]
    table = format_table(report)
    assert "rank" in table and "per clip" in table and "wrote" not in table  # no --out: no pictures


# ------------------------------------------------------------------------------------------ bad input


def test_format_candidates_resolve_to_checked_artifact_dirs(tiny_artifact: Path, eval_media: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from liveavatar_lite.evaluate.settings import format_candidates

    arts = tmp_path / "arts"
    shutil.copytree(tiny_artifact, arts / "int8")
    shutil.copytree(tiny_artifact, arts / "int4")  # an int8 artifact under the wrong name
    assert [s.artifact for s in format_candidates(("int8",), arts)] == [arts / "int8"]
    with pytest.raises(UserError, match="holds a int8 artifact, not int4"):
        format_candidates(("int4",), arts)
    code, err = run_cli(capsys, *eval_args(arts / "int8", eval_media, "--candidates", "int8,fp8"))
    assert_one_line(code, err, f"no artifact directory {arts / 'fp8'}", exit_code=2)


@pytest.mark.parametrize("extra, match", [
    ((), "nothing to compare"),
    (("--candidate", "{art}:kv=fp16"), "must be one of bf16, fp8, int8"),
    (("--candidate", "{art}:speed=2"), "unknown setting 'speed'"),
    (("--candidate", "{art}:profile=nope"), "unknown device profile 'nope'"),
    (("--candidate", "{art}", "--device-profile", "nope"), "unknown device profile 'nope'"),
    (("--candidate", "{tmp}/missing"), "no artifact directory"),
    (("--kv", "fp16"), "is not one of bf16, fp8, int8"),
    (("--candidates", "int3"), "is not one of bf16, int8"),
    (("--candidate", "{art}:kv=int8", "--kv", "bf16"), "sets kv and --kv sweeps it"),
    (("--artifacts", "{tmp}"), "give --candidates too"),
    (("--candidate", "{art}", "--out", "{tmp}/file"), "is a file"),
    (("--candidate", "{art}", "--image", "{tmp}/missing.png"), "missing.png"),
    (("--candidate", "{art}", "--vram", "nan"), "must be a finite number"),
    (("--candidate", "{art}", "--size", "64x"), "not of the form WIDTH*HEIGHT"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_artifact: Path, eval_media: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], match: str) -> None:
    (tmp_path / "file").write_text("x")
    extra = tuple(e.format(art=tiny_artifact, tmp=tmp_path) for e in extra)
    code, err = run_cli(capsys, *eval_args(tiny_artifact, eval_media), *extra)  # a repeated flag: the last wins
    assert_one_line(code, err, match, exit_code=2)
    assert not (tmp_path / "file").is_dir() and not list(tmp_path.glob(".eval-work-*"))


def test_flags_become_each_settings_pipeline_options(tmp_path: Path) -> None:
    """--vram/--ram/--device-profile/--cache-dir are the defaults; a setting's own keys win."""
    from liveavatar_lite.cli import build_parser
    from liveavatar_lite.commands.eval_cmd import build_job
    from liveavatar_lite.evaluate.run import _options

    args = build_parser().parse_args([
        "eval", "--reference", "ref", "--candidate", "a:vram=8,kv=int8", "--candidate", "b:compile=on",
        "--image", "p.png", "--audio", "s.wav", "--prompt", "x", "--vram", "24", "--ram", "32",
        "--device-profile", "rtx4090", "--cache-dir", str(tmp_path), "--no-progress"])
    job = build_job(args)
    a, b = (_options(job, s) for s in job.candidates)
    ref = _options(job, job.reference)
    assert (a.vram_gb, a.ram_gb, a.kv_dtype, a.compile_units) == (8.0, 32.0, "int8", "auto")
    assert (b.vram_gb, b.kv_dtype, b.compile_units, b.device_profile) == (24.0, "bf16", "on", "rtx4090")
    assert ref.artifact == Path("ref") and ref.cache_dir == tmp_path and ref.progress is False


def test_face_and_mouth_boxes_follow_the_framing() -> None:
    assert M.face_box(384, 704) == M.Box(56, 267, 246, 458)  # centred, upper-middle (docs/eval.md)
    assert M.mouth_box(64, 64) == M.Box(32, 42, 23, 41)
    f, m = M.face_box(704, 384), M.mouth_box(704, 384)  # portrait: the same rule on the short side
    assert f.x0 <= m.x0 < m.x1 <= f.x1 and f.y0 <= m.y0 < m.y1 <= f.y1


# ------------------------------------------------------------------------------------------ out of memory

class _FakeRenderer:
    """Constant frames and latents per block; raises `oom` at block 1 (when set)."""

    blocks_per_clip = 4

    def __init__(self, height: int, width: int, oom: BaseException | None) -> None:
        self.height, self.width, self.oom = height, width, oom

    def block_output(self, clip: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        if self.oom is not None and block == 1:
            raise self.oom
        return (np.full((16, 3, self.height // 8, self.width // 8), 0.5, np.float32),
                np.full((12, self.height, self.width, 3), 100 + 10 * block, np.uint8))


class _FakeBackend:
    def __init__(self, oom: BaseException | None) -> None:
        self.oom = oom

    def load(self, size: tuple[int, int]) -> None:
        pass

    def build(self, inputs: Any) -> _FakeRenderer:
        return _FakeRenderer(inputs.height, inputs.width, self.oom)


@pytest.mark.parametrize("oom", ["torch", "onnxruntime"])
def test_a_candidate_out_of_memory_is_exit_3_and_keeps_the_finished_ones(
        tiny_artifact: Path, eval_media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, oom: str) -> None:
    """As generate: running out of memory (torch's CUDA OOM, ONNX Runtime's allocation failure) is the
    budget's fault, one line and exit 3, not an internal error (70); report.json keeps candidate 1."""
    import torch

    from liveavatar_lite.evaluate import run

    error = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if oom == "torch" else
             RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"))
    monkeypatch.setattr(run, "_open_artifact", lambda i, s, opts: _FakeBackend(error if i == 2 else None))
    out = tmp_path / "ev"
    code, err = run_cli(capsys, *eval_args(tiny_artifact, eval_media, "--candidate", str(tiny_artifact),
                                           "--candidate", f"{tiny_artifact}:kv=int8", "--out", str(out)))
    assert_one_line(code, err, "art:kv=int8: out of memory; give it a smaller budget", exit_code=3)
    report = json.loads((out / "report.json").read_text())
    assert [c["label"] for c in report["candidates"]] == ["art"]
    assert report["candidates"][0]["overall"]["psnr_db"] == "inf"
