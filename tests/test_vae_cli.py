"""`liveavatar-lite vae export|decode`: end to end on the tiny VAE, and bad input -> one line, exit 2, no output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from vae_fixtures import random_latents, random_vae, random_vae_state

from liveavatar_lite.cli import main
from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.vae_export import frames_to_uint8


@pytest.fixture(scope="session")
def u8_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vae export DIR OUT.onnx` on a directory holding the seeded tiny Wan2.1_VAE.pth (fp32, uint8 frames)."""
    root = tmp_path_factory.mktemp("vae_cli")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(random_vae_state(PRESETS["tiny"].vae, seed=0), ckpt / "Wan2.1_VAE.pth")
    out = root / "dec.onnx"
    assert main(["vae", "export", str(ckpt), str(out)]) == 0
    return out


def _run_fails(argv: list[str], capsys, needle: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("liveavatar-lite vae: error:") and needle in err[0], err


def test_decode_matches_torch_uint8(u8_onnx: Path, tmp_path: Path) -> None:
    z = random_latents((1, 16, 4, 3, 2), seed=11)
    np.save(tmp_path / "z.npy", z[0].numpy())
    out = tmp_path / "frames.npy"
    assert main(["vae", "decode", "--onnx", str(u8_onnx), "--latents", str(tmp_path / "z.npy"),
                 "--out", str(out), "--chunk", "3"]) == 0
    frames = np.load(out)
    assert frames.dtype == np.uint8 and frames.shape == (13, 24, 16, 3)
    with torch.no_grad():
        want = frames_to_uint8(random_vae(PRESETS["tiny"].vae, seed=0).decode(z)).numpy()
    assert np.abs(frames.astype(np.int16) - want.astype(np.int16)).max() <= 1  # float->uint8 rounding edge


def test_bad_inputs_leave_no_output(u8_onnx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "frames.npy"
    base = ["vae", "decode", "--onnx", str(u8_onnx), "--out", str(out), "--latents"]
    np.save(tmp_path / "ch8.npy", np.zeros((8, 2, 3, 2), np.float32))
    _run_fails(base + [str(tmp_path / "ch8.npy")], capsys, "latents must be [16, T, h, w]")
    bad = np.zeros((16, 2, 3, 2), np.float32)
    bad[0, 0, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    _run_fails(base + [str(tmp_path / "inf.npy")], capsys, "finite")
    _run_fails(base + [str(tmp_path / "nope.npy")], capsys, "does not exist")
    np.save(tmp_path / "ok.npy", np.zeros((16, 2, 3, 2), np.float32))
    ok = ["--latents", str(tmp_path / "ok.npy"), "--out", str(out)]
    _run_fails(["vae", "decode", "--onnx", str(tmp_path / "no.onnx"), *ok], capsys, "does not exist")
    foreign = tmp_path / "foreign.onnx"
    import onnx

    model = onnx.load(str(u8_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    _run_fails(["vae", "decode", "--onnx", str(foreign), *ok], capsys, "not a liveavatar-lite VAE decoder")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_export_bad_checkpoint(tmp_path: Path, capsys) -> None:
    _run_fails(["vae", "export", str(tmp_path), str(tmp_path / "x.onnx")], capsys, "VAE weights not found")
    state = random_vae_state(PRESETS["tiny"].vae, seed=0)
    state.pop("decoder.head.2.bias")
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    _run_fails(["vae", "export", str(tmp_path), str(tmp_path / "x.onnx")], capsys, "decoder.head.2.bias")
    assert not (tmp_path / "x.onnx").exists()
