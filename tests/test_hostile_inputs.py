"""Hostile and careless input, over every subcommand: one line naming the problem, a non-zero exit,
no traceback, nothing half-written, nothing read or written outside the command's own directories,
no code run from a data file (docs/errors.md lists each class and what the user gets).

Fast: tiny fixtures, `liveavatar-lite` called in-process; generate runs against a fake backend
(the real artifact paths are in test_hostile_damage.py and test_generate_e2e.py).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hostile_fixtures import assert_one_line, run_cli, small_tmpfs, use_backend, write_media, write_pth
from media_fixtures import write_speech
from safetensors.torch import load_file, save_file

from liveavatar_lite.artifact.checkpoint import DIT_CONFIG, DIT_INDEX, LORA_FILE
from liveavatar_lite.pipeline.workdir import RenderWorkDir

SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"


# ------------------------------------------------------------------------------------------ fixtures

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_media(tmp_path_factory.mktemp("media"))


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """`generate` renders with test_generate's FakeBackend instead of opening an artifact."""
    from test_generate import FakeBackend

    use_backend(monkeypatch, FakeBackend())


def quantize(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(capsys, "quantize", dit_ckpt, out, "-q", "int8", "--components", "dit", "--no-progress", *extra)


def gen_args(root: Path, media: Path, **over: Any) -> list[str]:
    args = {"--artifact": root / "art", "--image": media / "photo.png", "--audio": media / "speech.wav",
            "--prompt": "a person talking", "--out": root / "out" / "o.mp4", "--size": "64*64",
            "--cache-dir": root / "cache", "--checkpoint-interval": "0"}
    args.update({k: v for k, v in over.items()})
    flat = ["generate", "--no-progress"]
    for k, v in args.items():
        if v is not None:
            flat += [k, str(v)]
    return flat


def _no_work_dir(out: Path) -> None:
    """Input errors are found before any work dir or output folder is created."""
    assert not RenderWorkDir.path_for(out).exists() and not out.exists()
    assert not out.parent.exists(), f"{out.parent} was created for a refused render"


# ------------------------------------------------------------------------------------------ numeric flags

NUMERIC_FLAG_CASES = [
    # (argv after the subcommand's positionals, text in the error line)
    (["plan", "14b", "--format", "int8", "--vram", "nan"], "--vram"),
    (["plan", "14b", "--format", "int8", "--vram", "inf"], "--vram"),
    (["plan", "14b", "--format", "int8", "--vram", "-2"], "--vram"),
    (["plan", "14b", "--format", "int8", "--vram", "24", "--ram", "nan"], "--ram"),
    (["plan", "14b", "--format", "int8", "--vram", "1e400"], "--vram"),
    (["calibrate", "CK", "--out", "m.json", "--samples", "0"], "--samples"),
    (["calibrate", "CK", "--out", "m.json", "--seconds", "-1"], "--seconds"),
    (["calibrate", "CK", "--out", "m.json", "--seconds", "nan"], "--seconds"),
    (["calibrate", "CK", "--out", "m.json", "--height", "0"], "--height"),
    (["calibrate", "CK", "--out", "m.json", "--blocks", "0"], "--blocks"),
    (["calibrate", "CK", "--out", "m.json", "--seed", "-1"], "--seed"),
    (["quantize", "CK", "OUT", "-q", "int8", "--target-size", "nan", "--measurement", "m.json"], "--target-size"),
    (["quantize", "CK", "OUT", "-q", "int8", "--target-size", "-1", "--measurement", "m.json"], "--target-size"),
    (["quantize", "CK", "OUT", "-q", "int8", "--target-size", "inf", "--measurement", "m.json"], "--target-size"),
    (["vae", "decode", "--onnx", "d.onnx", "--latents", "z.npy", "--out", "f.npy", "--chunk", "0"], "--chunk"),
    (["vae", "decode", "--onnx", "d.onnx", "--latents", "z.npy", "--out", "f.npy", "--chunk", "1e9"], "--chunk"),
    (["vae", "decode", "--onnx", "d.onnx", "--latents", "z.npy", "--out", "f.npy", "--gpu-mem-limit-gb", "nan"],
     "--gpu-mem-limit-gb"),
    (["vae", "decode", "--onnx", "d.onnx", "--latents", "z.npy", "--out", "f.npy", "--threads", "0"], "--threads"),
    (["download", "DIR", "--max-workers", "0"], "--max-workers"),
    (["plan", "14b", "--format", "int8", "--vram", "24", "--ranks", "0"], "--ranks"),
    (["serve", "DIR", "--port", "70000"], "--port"),
    (["serve", "DIR", "--max-queue", "0"], "--max-queue"),
    (["serve", "DIR", "--max-upload-mb", "nan"], "--max-upload-mb"),
    (["serve", "DIR", "--request-timeout", "inf"], "--request-timeout"),
    (["serve", "DIR", "--worker-memory-gb", "-1"], "--worker-memory-gb"),
    (["serve", "DIR", "--recycle-after", "-1"], "--recycle-after"),
    (["serve", "DIR", "--vram", "nan"], "--vram"),
]
GENERATE_FLAG_CASES = [
    ("--vram", "nan"), ("--vram", "inf"), ("--vram", "0"), ("--ram", "nan"), ("--ram", "-1"),
    ("--checkpoint-interval", "nan"), ("--checkpoint-interval", "-1"), ("--checkpoint-interval", "inf"),
    ("--seed", str(2**64)), ("--seed", "-1"), ("--seed", "1e30"), ("--num-clip", "0"), ("--num-clip", "nan"),
    ("--ranks", "0"), ("--ranks", "1e9"),
]


@pytest.mark.parametrize("argv,flag", NUMERIC_FLAG_CASES, ids=[f"{a[0]}{a[-2]}={a[-1]}" for a, _ in NUMERIC_FLAG_CASES])
def test_numeric_flags_out_of_range(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], flag: str) -> None:
    argv = [str(tmp_path / a) if a in ("CK", "OUT", "DIR") else a for a in argv]
    code, err = run_cli(capsys, *argv)
    assert_one_line(code, err, flag, exit_code=2)
    assert sorted(tmp_path.iterdir()) == []  # refused while parsing: nothing created


@pytest.mark.parametrize("flag,value", GENERATE_FLAG_CASES, ids=[f"{f}={v}" for f, v in GENERATE_FLAG_CASES])
def test_generate_numeric_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path, media: Path, flag: str,
                                value: str) -> None:
    code, err = run_cli(capsys, *gen_args(tmp_path, media, **{flag: value}))
    assert_one_line(code, err, flag, exit_code=2)
    _no_work_dir(tmp_path / "out" / "o.mp4")


# ------------------------------------------------------------------------------------------ configs

CONFIG_EDITS = {
    "not-json": lambda text: "{not json",
    "json-array": lambda text: "[1, 2, 3]",
    "num_layers-string": lambda text: _edit(text, num_layers="4"),
    "num_layers-zero": lambda text: _edit(text, num_layers=0),
    "num_layers-negative": lambda text: _edit(text, num_layers=-3),
    "num_layers-1e6": lambda text: _edit(text, num_layers=1_000_000),
    "num_layers-float": lambda text: _edit(text, num_layers=4.5),
    "dim-absurd": lambda text: _edit(text, dim=2**40),
    "heads-zero": lambda text: _edit(text, num_heads=0),
    "patch_size-short": lambda text: _edit(text, patch_size=[1, 2]),
    "missing-field": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "ffn_dim"}),
}


def _edit(text: str, **kw: Any) -> str:
    d = json.loads(text)
    d.update(kw)
    return json.dumps(d)


@pytest.mark.timeout(60)  # an absurd config must be refused up front, not hang building the model
@pytest.mark.parametrize("kind", sorted(CONFIG_EDITS))
def test_malformed_config(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path, kind: str) -> None:
    cfg = dit_ckpt / DIT_CONFIG
    cfg.write_text(CONFIG_EDITS[kind](cfg.read_text()))
    code, err = quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "config.json", exit_code=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------ safetensors headers

def _header_edit(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _first_key(h: dict) -> str:
    return min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _overlap(h: dict) -> None:
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = h[keys[0]], h[keys[1]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


HEADER_EDITS = {
    "overlapping-offsets": _overlap,
    "out-of-range-offsets": lambda h: h[_first_key(h)].update(data_offsets=[10**12, 10**12 + 8]),
    "negative-shape": lambda h: h[_first_key(h)].update(shape=[-1, -h[_first_key(h)]["data_offsets"][1]]),
    "offsets-not-matching-shape": lambda h: h[_first_key(h)].update(shape=[1]),
    "unknown-dtype": lambda h: h[_first_key(h)].update(dtype="Q42"),
    "float-offsets": lambda h: h[_first_key(h)].update(data_offsets=[0.0, 8.5]),
    "entry-not-an-object": lambda h: h.update({_first_key(h): "hello"}),
    "metadata-not-a-map": lambda h: h.update(__metadata__=[1, 2]),
}


@pytest.mark.parametrize("kind", sorted(HEADER_EDITS))
def test_malformed_safetensors_header(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path, kind: str) -> None:
    _header_edit(dit_ckpt / SHARD1, HEADER_EDITS[kind])
    code, err = quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, SHARD1, exit_code=2)


def test_header_length_beyond_the_file(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path) -> None:
    raw = (dit_ckpt / SHARD1).read_bytes()
    (dit_ckpt / SHARD1).write_bytes((len(raw) * 4).to_bytes(8, "little") + raw[8:])
    code, err = quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "corrupt safetensors header", exit_code=2)


# ------------------------------------------------------------------------------------------ .pth storages

_RAW = struct.pack("<4f", 1, 2, 3, 4)
PTH_CASES = {
    "bogus-dtype": ({"w": ("EvilStorage", 4, 0, (2, 2), (2, 1), _RAW)}, {}, "unsupported object"),
    "negative-numel": ({"w": ("FloatStorage", -4, 0, (2, 2), (2, 1), _RAW)}, {}, "negative or malformed"),
    "numel-beyond-bytes": ({"w": ("FloatStorage", 2**40, 0, (2**20, 2**20), (2**20, 1), _RAW)}, {}, "claims"),
    "negative-shape": ({"w": ("FloatStorage", 4, 0, (-2, -2), (2, 1), _RAW)}, {}, "negative or malformed"),
    "view-past-storage": ({"w": ("FloatStorage", 4, 3, (2, 2), (2, 1), _RAW)}, {}, "past the end"),
    "compressed-storage": ({"w": ("FloatStorage", 4, 0, (2, 2), (2, 1), _RAW)}, {"compress": True}, "compressed"),
    "code-in-pickle": ({"w": ("FloatStorage", 4, 0, (2, 2), (2, 1), _RAW)},
                       {"evil": ("os", "system", "touch PWNED")}, "unsupported object os.system"),
}


@pytest.mark.parametrize("kind", sorted(PTH_CASES))
def test_malformed_pth_storage(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path, kind: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    tensors, kw, match = PTH_CASES[kind]
    write_pth(dit_ckpt / "Wan2.1_VAE.pth", tensors, **kw)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "quantize", dit_ckpt, tmp_path / "out", "-q", "int8", "--components", "vae",
                        "--no-vae-onnx", "--no-progress")
    assert_one_line(code, err, match, exit_code=2)
    assert not (tmp_path / "PWNED").exists()  # no code ran from the data file
    code, err = run_cli(capsys, "vae", "export", dit_ckpt, tmp_path / "d.onnx")  # torch.load(weights_only) path
    assert_one_line(code, err, "Wan2.1_VAE.pth", exit_code=2)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "d.onnx").exists()


# ------------------------------------------------------------------------------------------ LoRA files

def _lora_edit(dit_ckpt: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    t = load_file(str(dit_ckpt / LORA_FILE))
    edit(t)
    save_file(t, str(dit_ckpt / LORA_FILE))
    return dit_ckpt / LORA_FILE


def _rank0(t: dict) -> None:
    for k in list(t):
        a = t[k]
        t[k] = a[:0].contiguous() if ".lora_A." in k else a[:, :0].contiguous()


LORA_CASES = {
    "rank-0": (_rank0, "rank 0"),
    "half-missing": (lambda t: t.pop(next(k for k in t if ".lora_B." in k)), "not both lora_A and lora_B"),
    "integer-dtype": (lambda t: t.update({k: torch.zeros_like(v, dtype=torch.int8) for k, v in t.items()}), "dtype"),
    "not-a-lora-key": (lambda t: t.update({"blocks.0.weird": torch.zeros(2)}), "not a PEFT LoRA key"),
}


@pytest.mark.parametrize("kind", sorted(LORA_CASES))
def test_malformed_lora(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path, kind: str) -> None:
    edit, match = LORA_CASES[kind]
    _lora_edit(dit_ckpt, edit)
    code, err = quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, match, exit_code=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------ FIFOs and devices

@pytest.mark.timeout(120)
def test_fifo_and_device_inputs_are_refused_without_blocking(capsys: pytest.CaptureFixture[str], dit_ckpt: Path,
                                                             tmp_path: Path, media: Path, fake_backend: None) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = [
        (["quantize", dit_ckpt, tmp_path / "o1", "-q", "int8", "--lora", fifo], "is a FIFO (named pipe)"),
        (gen_args(tmp_path, media, **{"--audio": fifo}), "is a FIFO (named pipe)"),
        (gen_args(tmp_path, media, **{"--image": fifo}), "is a FIFO (named pipe)"),
        (gen_args(tmp_path, media, **{"--audio": "/dev/zero"}), "is a character device"),
        (["vae", "decode", "--onnx", tmp_path / "d.onnx", "--latents", fifo, "--out", tmp_path / "f.npy"],
         "is a FIFO (named pipe)"),
        (["inspect", tmp_path / "fifo_art"], "is a FIFO (named pipe)"),
    ]
    (tmp_path / "fifo_art").mkdir()
    os.mkfifo(tmp_path / "fifo_art" / "manifest.json")
    wav2vec = dit_ckpt / "wav2vec2-large-xlsr-53-english"
    wav2vec.mkdir()
    (wav2vec / "config.json").write_text("{}")
    os.mkfifo(wav2vec / "model.safetensors")  # a folder the converter copies: never opened either
    cases.append((["quantize", dit_ckpt, tmp_path / "o2", "-q", "int8", "--components", "audio", "--no-progress"],
                  "is a FIFO (named pipe)"))
    for argv, match in cases:
        code, err = run_cli(capsys, *argv)
        assert_one_line(code, err, match)


# ------------------------------------------------------------------------------------------ outputs

def test_quantize_out_dir_is_a_file(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("mine")
    code, err = quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "not a directory")
    assert (tmp_path / "out").read_text() == "mine"


def test_quantize_out_dir_parent_is_a_file(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("mine")
    code, err = quantize(capsys, dit_ckpt, tmp_path / "f" / "out")
    assert_one_line(code, err, str(tmp_path / "f"))


@pytest.mark.parametrize("kind", ["dir", "fifo", "parent-is-file", "wrong-suffix", "telemetry-dir"])
def test_generate_bad_out(capsys: pytest.CaptureFixture[str], tmp_path: Path, media: Path, fake_backend: None,
                          kind: str) -> None:
    over: dict[str, Any] = {}
    if kind == "dir":
        (tmp_path / "o.mp4").mkdir()
        over["--out"], match = tmp_path / "o.mp4", "a directory"
    elif kind == "fifo":
        os.mkfifo(tmp_path / "o.mp4")
        over["--out"], match = tmp_path / "o.mp4", "FIFO"
    elif kind == "parent-is-file":
        (tmp_path / "f").write_text("x")
        over["--out"], match = tmp_path / "f" / "sub" / "o.mp4", "not a directory"
    elif kind == "wrong-suffix":
        over["--out"], match = tmp_path / "o.avi", ".mp4"
    else:
        (tmp_path / "tel").mkdir()
        over["--telemetry"], match = tmp_path / "tel", "--telemetry"
    code, err = run_cli(capsys, *gen_args(tmp_path, media, **over))
    assert_one_line(code, err, match, exit_code=2)
    assert not list(tmp_path.glob(".*.work"))


def test_read_only_outputs(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path, media: Path,
                           fake_backend: None) -> None:
    with small_tmpfs(tmp_path / "ro", "1m") as ro:
        from hostile_fixtures import remount

        remount(ro, "ro")
        code, err = run_cli(capsys, *gen_args(tmp_path, media, **{"--out": ro / "o.mp4"}))
        assert_one_line(code, err, "read-only", exit_code=2)
        code, err = quantize(capsys, dit_ckpt, ro / "art")
        assert_one_line(code, err, "read-only")
        code, err = run_cli(capsys, "calibrate", dit_ckpt, "--out", ro / "m.json")
        assert_one_line(code, err, "read-only")


def test_vae_outputs_that_are_not_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "d.onnx").mkdir()
    np.save(tmp_path / "z.npy", np.zeros((16, 1, 2, 2), np.float32))
    (tmp_path / "dit_ckpt").mkdir()
    (tmp_path / "dit_ckpt" / "Wan2.1_VAE.pth").write_bytes(b"x")
    code, err = run_cli(capsys, "vae", "export", tmp_path / "dit_ckpt", tmp_path / "d.onnx")
    assert_one_line(code, err, "a directory")
    code, err = run_cli(capsys, "vae", "decode", "--onnx", tmp_path / "missing.onnx", "--latents", tmp_path / "z.npy",
                        "--out", tmp_path / "f.npy")
    assert_one_line(code, err, "does not exist")


# ------------------------------------------------------------------------------------------ prompts, latents

@pytest.mark.parametrize("prompt,match", [
    (b"caf\xe9 in latin-1".decode("utf-8", "surrogateescape"), "not valid UTF-8"),
    ("nul\0inside", "NUL"),
    ("x" * 50_000, "characters"),
], ids=["non-utf8-bytes", "nul", "too-long"])
def test_bad_prompts(capsys: pytest.CaptureFixture[str], tmp_path: Path, media: Path, fake_backend: None,
                     prompt: str, match: str) -> None:
    code, err = run_cli(capsys, *gen_args(tmp_path, media, **{"--prompt": prompt}))
    assert_one_line(code, err, match, exit_code=2)
    _no_work_dir(tmp_path / "out" / "o.mp4")


@pytest.fixture
def u8_onnx(tiny_artifact: Path) -> Path:
    return tiny_artifact / "vae" / "decoder.onnx"  # the artifact's uint8-frames decoder (read-only)


LATENTS = {
    "zero-frames": (np.zeros((16, 0, 4, 4), np.float32), "T >= 1"),
    "h-of-one": (np.zeros((16, 1, 1, 4), np.float32), "2 <= h, w"),
    "nan": (np.full((16, 1, 4, 4), np.nan, np.float32), "finite"),
    "wrong-channels": (np.zeros((3, 1, 4, 4), np.float32), "latents must be"),
    "integers": (np.zeros((16, 1, 4, 4), np.int32), "float"),
}


@pytest.mark.parametrize("kind", sorted(LATENTS) + ["object-array", "npz"])
def test_vae_decode_bad_latents(capsys: pytest.CaptureFixture[str], tmp_path: Path, u8_onnx: Path, kind: str) -> None:
    z = tmp_path / "z.npy"
    if kind == "object-array":
        np.save(z, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        match = "not a readable .npy"
    elif kind == "npz":
        np.savez(tmp_path / "z.npz", a=np.zeros(3))
        os.replace(tmp_path / "z.npz", z)
        match = "not a single array"
    else:
        arr, match = LATENTS[kind]
        np.save(z, arr)
    code, err = run_cli(capsys, "vae", "decode", "--onnx", u8_onnx, "--latents", z, "--out", tmp_path / "f.npy")
    assert_one_line(code, err, match, exit_code=2)
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "f.npy.tmp").exists()


# ------------------------------------------------------------------------------------------ resume journals, states

def _render_then_break(capsys, tmp_path: Path, media: Path) -> Path:  # type: ignore[no-untyped-def]
    """A render to out/o.mp4 interrupted after clip 0 (its journal + state on disk); the work dir."""
    import liveavatar_lite.decode.video as video

    out = tmp_path / "out" / "o.mp4"
    real = video.mux_segments
    video.mux_segments = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # killed while muxing
    try:
        code, _ = run_cli(capsys, *gen_args(tmp_path, media))
    finally:
        video.mux_segments = real
    assert code == 130
    return RenderWorkDir.path_for(out)


def _journal_edit(work: Path, edit) -> None:  # type: ignore[no-untyped-def]
    j = json.loads((work / "journal.json").read_text())
    edit(j)
    (work / "journal.json").write_text(json.dumps(j))


JOURNAL_CASES = {
    "truncated": (lambda w: (w / "journal.json").write_bytes((w / "journal.json").read_bytes()[:20]), "unreadable"),
    "garbage": (lambda w: (w / "journal.json").write_bytes(os.urandom(64)), "unreadable"),
    "json-list": (lambda w: (w / "journal.json").write_text("[]"), "damaged"),
    "segments-not-list": (lambda w: _journal_edit(w, lambda j: j.update(segments="clip")), "damaged"),
    "frames-string": (lambda w: _journal_edit(w, lambda j: j["segments"][0].update(frames="45")), "damaged"),
    "state-clips-beyond": (lambda w: _journal_edit(w, lambda j: j.update(state_clips=99)), "damaged"),
    "state-name-odd": (lambda w: _journal_edit(w, lambda j: j.update(state="mine.pt")), "damaged"),
    "state-garbage": (lambda w: (w / "state_00000.pt").write_bytes(os.urandom(200)), "state_00000.pt"),
    "state-truncated": (lambda w: (w / "state_00000.pt").write_bytes((w / "state_00000.pt").read_bytes()[:100]),
                        "state_00000.pt"),
    "state-wrong-content": (lambda w: torch.save({"nothing": torch.zeros(1)}, w / "state_00000.pt"), "state_00000.pt"),
}  # (a missing segment is rendered again: test_hardening3.py class 10)


@pytest.mark.parametrize("kind", sorted(JOURNAL_CASES))
def test_damaged_resume_state(capsys: pytest.CaptureFixture[str], tmp_path: Path, media: Path, fake_backend: None,
                              kind: str) -> None:
    work = _render_then_break(capsys, tmp_path, media)
    damage, match = JOURNAL_CASES[kind]
    damage(work)
    if kind == "state-garbage" or kind.startswith("state-") and kind != "state-clips-beyond" and kind != "state-name-odd":
        _journal_edit(work, lambda j: j.update(segments=j["segments"][:1]))  # resume must load the state
    code, err = run_cli(capsys, *gen_args(tmp_path, media), "--resume")
    assert_one_line(code, err, match, exit_code=2)
    assert "run without --resume" in err
    assert not (tmp_path / "out" / "o.mp4").exists()
    # and the advice works: without --resume the render starts over and finishes
    assert run_cli(capsys, *gen_args(tmp_path, media))[0] == 0


# ------------------------------------------------------------------------------------------ artifacts

MANIFEST_EDITS = {
    "unit-file-leaves": (lambda m: m["units"][0].update(file="../../victim.safetensors"), "leaves"),
    "absolute-onnx-path": (lambda m: m["paths"].update(vae_onnx="/etc/passwd"), "leaves"),
    "negative-sizes": (lambda m: m["units"][0].update(data_nbytes=-64), "malformed manifest"),
    "part-past-the-file": (lambda m: m["units"][0]["tensors"][0]["parts"][0].update(offset=10**12), "malformed manifest"),
    "dit-absurd": (lambda m: m["dit"].update(num_layers=10**6), "malformed manifest"),
    "wrong-type": (lambda m: m.update(units={"a": 1}), "malformed manifest"),
}


@pytest.mark.parametrize("kind", sorted(MANIFEST_EDITS))
def test_hostile_manifest(capsys: pytest.CaptureFixture[str], tiny_artifact: Path, tmp_path: Path, kind: str) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    edit, match = MANIFEST_EDITS[kind]
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))
    for argv in (["inspect", art], ["plan", art, "--vram", "24"]):
        code, err = run_cli(capsys, *argv)
        assert_one_line(code, err, match, exit_code=2)


def test_index_shard_outside_the_checkpoint(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path) -> None:
    index = json.loads((dit_ckpt / DIT_INDEX).read_text())
    outside = tmp_path / "outside.safetensors"
    shutil.copy(dit_ckpt / SHARD1, outside)
    index["weight_map"] = {k: ("../outside.safetensors" if v == SHARD1 else v) for k, v in index["weight_map"].items()}
    (dit_ckpt / DIT_INDEX).write_text(json.dumps(index))
    code, err = quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "leaves", exit_code=2)


# ------------------------------------------------------------------------------------------ input errors before work

@pytest.mark.parametrize("kind", ["missing-image", "corrupt-image", "missing-audio", "silent-audio", "bad-size",
                                  "missing-artifact"])
def test_input_errors_before_any_work_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path, media: Path,
                                          kind: str, request: pytest.FixtureRequest) -> None:
    if kind != "missing-artifact":
        request.getfixturevalue("fake_backend")
    local = tmp_path / "m"
    shutil.copytree(media, local)
    over: dict[str, Any] = {}
    if kind == "missing-image":
        over["--image"] = local / "nope.jpg"
    elif kind == "corrupt-image":
        (local / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    elif kind == "missing-audio":
        over["--audio"] = local / "nope.wav"
    elif kind == "silent-audio":
        write_speech(local / "speech.wav", 1.0, amp=0.0)
    elif kind == "bad-size":
        over["--size"] = "10*10"
    code, err = run_cli(capsys, *gen_args(tmp_path, local, **{"--out": tmp_path / "a" / "b" / "o.mp4", **over}))
    assert_one_line(code, err, exit_code=2)
    _no_work_dir(tmp_path / "a" / "b" / "o.mp4")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------ the CLI itself

def test_unexpected_exception_is_one_line_with_a_log(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import liveavatar_lite.commands.inspect_cmd as inspect_cmd

    def boom(args: Any) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspect_cmd, "run", boom)
    monkeypatch.setenv("LIVEAVATAR_LITE_CACHE", str(tmp_path / "cache"))
    code, err = run_cli(capsys, "inspect", tmp_path)
    assert_one_line(code, err, "internal error: ZeroDivisionError: a bug", exit_code=70)
    log = Path(err.split("the traceback is in ")[1].split(" (please")[0])
    assert log.parent == tmp_path / "cache" / "logs" and "Traceback" in log.read_text() and "a bug" in log.read_text()
    code, err = run_cli(capsys, "inspect", tmp_path, "-v")  # -v after the subcommand: the traceback too
    assert code == 70 and "Traceback" in err and "ZeroDivisionError" in err


def test_verbose_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_cli(capsys, "plan", "tiny", "--format", "int8", "--vram", "24", "--json", "-v")
    assert code == 0
    code, _ = run_cli(capsys, "-v", "plan", "tiny", "--format", "int8", "--vram", "24", "--json")
    assert code == 0


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["quantize", "--help"], ["vae", "--help"], ["vae", "decode", "--help"], ["vae", "export", "--help"],
                 ["bench", "--help"], ["download", "--help"]):
        with pytest.raises(SystemExit):
            from liveavatar_lite.cli import main

            main(argv)
        text = capsys.readouterr().out
        assert "calibration.measure" not in text and len(text.split("\n\n")[1]) > 80  # a real description
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["vae", "decode", "--help"])
    text = capsys.readouterr().out
    for flag in ("--device", "--chunk", "--threads", "--gpu-mem-limit-gb"):
        block = text.split(flag, 1)[1].split("\n  -", 1)[0]
        assert len(block.strip()) > 20, f"{flag} has no help"
