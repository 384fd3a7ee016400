"""The six kinds of damage an attacker or a careless user could do (issue 12), each shown refused,
plus full disks on a real (small tmpfs) file system and kill -9 / Ctrl-C recovery, byte-identical.

1. a LoRA holding NaN/Inf          -> quantize refuses, OUT_DIR left empty
2. names in journals / manifests / indexes that leave their directory -> refused, nothing touched
3. tampered units, decoder, audio encoder, tokenizer -> refused before use, naming the file
4. two renders to one --out        -> the second refuses (flock); the first finishes intact
5. a full disk                     -> one line; finished work kept; after freeing space the re-run
                                      continues to byte-identical output (quantize, generate's
                                      checkpoint and mux, the ONNX export)
6. a FIFO shard, an absurd config  -> refused up front (no hang)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_fixtures import (
    FAKE_BACKEND_CHILD,
    assert_one_line,
    fill_disk,
    remount,
    run_cli,
    small_tmpfs,
    use_backend,
)
from safetensors.torch import load_file, save_file

from liveavatar_lite.artifact.checkpoint import DIT_CONFIG, LORA_FILE
from liveavatar_lite.artifact.format import read_manifest, read_unit, verify_files
from liveavatar_lite.errors import ArtifactError
from liveavatar_lite.pipeline.workdir import RenderWorkDir

TESTS = Path(__file__).resolve().parent
SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


def _files(root: Path, skip: tuple[str, ...] = (".quantize-job.json",)) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


pytestmark = pytest.mark.usefixtures("private_cache")  # `media` (photo + 4.7 s speech) comes from conftest


def _quantize(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(capsys, "quantize", dit_ckpt, out, "-q", "int8", "--components", "dit", "--no-progress", *extra)


def _gen(root: Path, media: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--artifact", str(root / "art"), "--image", str(media / "photo.png"),
            "--audio", str(media / "speech.wav"), "--prompt", "a person talking", "--out", str(out),
            "--size", "64*64", "--cache-dir", str(root / "cache"), "--checkpoint-interval", "0", "--no-progress",
            *extra]


# ------------------------------------------------------------------------------------------ 1. LoRA NaN/Inf

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_1_lora_with_nan_or_inf_is_refused(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path,
                                           value: float) -> None:
    lora = load_file(str(dit_ckpt / LORA_FILE))
    key = sorted(k for k in lora if ".lora_B." in k)[-1]  # found mid-conversion: earlier units are written
    lora[key][0, 0] = value
    save_file(lora, str(dit_ckpt / LORA_FILE))
    code, err = _quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "contains NaN or Inf", exit_code=2)
    assert LORA_FILE in err
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


# ------------------------------------------------------------------------------------------ 2. containment

def _broken_render(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, root: Path,
                   media: Path) -> Path:
    """A render with a fake backend interrupted during the mux; its work dir (3 clips + a state)."""
    import liveavatar_lite.decode.video as video
    from test_generate import FakeBackend

    use_backend(monkeypatch, FakeBackend())
    with monkeypatch.context() as m:
        m.setattr(video, "mux_segments", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        code, _ = run_cli(capsys, *_gen(root, media, root / "out" / "o.mp4", "--checkpoint-interval", "3600"))
    assert code == 130
    return RenderWorkDir.path_for(root / "out" / "o.mp4")


@pytest.mark.parametrize("field", ["segment", "state"])
def test_2_resume_never_deletes_what_the_journal_names_outside(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               media: Path, field: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    work = _broken_render(capsys, monkeypatch, tmp_path, media)
    j = json.loads((work / "journal.json").read_text())
    if field == "segment":  # rewind_to_state would delete every segment after the (absent) state
        j["segments"][-1]["name"] = "../../victim.txt"
    else:
        j["state"], j["state_clips"] = "../../victim.txt", 1
    (work / "journal.json").write_text(json.dumps(j))
    code, err = run_cli(capsys, *_gen(tmp_path, media, tmp_path / "out" / "o.mp4", "--resume"))
    assert_one_line(code, err, "leaves", exit_code=2)
    assert victim.read_text() == "precious"


def test_2_manifest_and_index_names_stay_inside(capsys: pytest.CaptureFixture[str], tiny_artifact: Path,
                                                tmp_path: Path, dit_ckpt: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["paths"]["vae_onnx"] = "../../../etc/hostname"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="leaves"):
        read_manifest(art)
    index = dit_ckpt / "diffusion_pytorch_model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"] = {k: "/etc/hostname" for k in d["weight_map"]}
    index.write_text(json.dumps(d))
    code, err = _quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "leaves", exit_code=2)


def test_2_symlinked_work_dir_is_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path, media: Path) -> None:
    from test_generate import FakeBackend

    use_backend(monkeypatch, FakeBackend())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "o.mp4"
    RenderWorkDir.path_for(out).symlink_to(elsewhere, target_is_directory=True)
    code, err = run_cli(capsys, *_gen(tmp_path, media, out))
    assert_one_line(code, err, "symbolic link", exit_code=2)
    assert (elsewhere / "keep.txt").read_text() == "mine" and sorted(os.listdir(elsewhere)) == ["keep.txt"]


# ------------------------------------------------------------------------------------------ 3. tampering

def _tampered(tiny_artifact: Path, tmp_path: Path, rel: str, how: str = "flip") -> Path:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    p = art / rel
    if how == "flip":
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        p.write_bytes(bytes(raw))
    else:  # "extra": a file the converter did not write
        p.write_text("{}")
    return art


def test_3_tampered_unit_is_refused_where_it_is_read(tiny_artifact: Path, tmp_path: Path) -> None:
    art = _tampered(tiny_artifact, tmp_path, "units/block_001.safetensors")
    m = read_manifest(art)
    with pytest.raises(ArtifactError, match=r"block_001.safetensors: checksum mismatch"):
        read_unit(art, "block_001", manifest=m, verify=True)
    from liveavatar_lite.runtime.dit_runtime import artifact_units
    from liveavatar_lite.runtime.plan import Budget, make_plan
    from liveavatar_lite.runtime.device_profiles import get_profile
    from liveavatar_lite.runtime.plan_inputs import manifest_unit_sizes, plan_input

    plan = make_plan(plan_input(m.dit, (64, 64), m.quant.format, unit_sizes=manifest_unit_sizes(m)),
                     Budget(vram_bytes=1e15), get_profile("rtx4090"))
    units = {u.name: u for u in artifact_units(art, m, plan, pin=False)}
    units["block_000"].load()  # intact: fine
    with pytest.raises(ArtifactError, match="block_001.safetensors: checksum mismatch"):
        units["block_001"].load()  # the runtime's first read of a streamed / resident unit verifies it


@pytest.mark.parametrize("rel,how", [("vae/decoder.onnx", "flip"), ("wav2vec2/config.json", "flip"),
                                     ("tokenizer/tokenizer_config.json", "flip"), ("wav2vec2/model.safetensors", "extra")],
                         ids=["onnx-decoder", "audio-encoder", "tokenizer", "planted-weights"])
def test_3_tampered_component_refused_before_use(capsys: pytest.CaptureFixture[str], tiny_artifact: Path,
                                                 tmp_path: Path, media: Path, rel: str, how: str) -> None:
    art = _tampered(tiny_artifact, tmp_path, rel, how)
    assert art == tmp_path / "art"
    out = tmp_path / "o.mp4"
    code, err = run_cli(capsys, *_gen(tmp_path, media, out))
    assert_one_line(code, err, Path(rel).name, exit_code=2)
    assert ("checksum mismatch" in err) or ("not written by quantize" in err)
    assert not RenderWorkDir.path_for(out).exists()  # refused before the render started


def test_3_version_1_artifact_asks_for_a_requantize_which_upgrades_it(capsys: pytest.CaptureFixture[str],
                                                                     tiny_ckpt: Path, tiny_artifact: Path,
                                                                     tmp_path: Path, media: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 1  # as written before checksums: no xxh3, no file list
    m.pop("files")
    for u in m["units"]:
        u.pop("xxh3_128")
    (art / "manifest.json").write_text(json.dumps(m))
    job = json.loads((art / ".quantize-job.json").read_text())
    job.pop("fast")
    (art / ".quantize-job.json").write_text(json.dumps(job))
    assert run_cli(capsys, "inspect", art)[0] == 1  # readable; verification names what is missing
    code, err = run_cli(capsys, *_gen(tmp_path, media, tmp_path / "o.mp4"))
    assert_one_line(code, err, "re-run `liveavatar-lite quantize` into it", exit_code=2)
    before = {p: b for p, b in _files(art).items() if p != "manifest.json"}
    assert run_cli(capsys, "quantize", tiny_ckpt, art, "-q", "int8", "--no-progress")[0] == 0  # reuses every file
    assert {p: b for p, b in _files(art).items() if p != "manifest.json"} == before
    assert (art / "manifest.json").read_bytes() == (tiny_artifact / "manifest.json").read_bytes()
    verify_files(art, read_manifest(art))


# ------------------------------------------------------------------------------------------ 4. concurrent renders

def test_4_second_render_to_the_same_out_refuses(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, media: Path) -> None:
    from test_generate import FakeBackend

    use_backend(monkeypatch, FakeBackend())
    out = tmp_path / "o.mp4"
    first = RenderWorkDir.open(out, "someone-else", resume=False)  # another render holds the work dir
    (first.root / "clip_00000.mp4").write_bytes(b"finished clip")
    code, err = run_cli(capsys, *_gen(tmp_path, media, out))
    assert_one_line(code, err, "another render is writing", exit_code=2)
    assert (first.root / "clip_00000.mp4").read_bytes() == b"finished clip"  # nothing of the first deleted
    first.unlock()
    assert run_cli(capsys, *_gen(tmp_path, media, out))[0] == 0  # free again


def _child(argv: list[str], delay: float = 0.05) -> subprocess.Popen:
    code = FAKE_BACKEND_CHILD.format(tests=str(TESTS), argv=argv, delay=delay)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_clips(journal: Path, proc: subprocess.Popen, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["segments"]) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)


def test_4_two_processes_one_out(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path, media: Path) -> None:
    from test_generate import FakeBackend

    out = tmp_path / "o.mp4"
    proc = _child(_gen(tmp_path, media, out), delay=0.1)
    _wait_for_clips(RenderWorkDir.path_for(out) / "journal.json", proc, 1)
    assert proc.poll() is None, "the first render ended too soon"
    use_backend(monkeypatch, FakeBackend())
    code, err = run_cli(capsys, *_gen(tmp_path, media, out))
    assert_one_line(code, err, "another render is writing", exit_code=2)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()  # the first one was not harmed
    assert run_cli(capsys, *_gen(tmp_path, media, tmp_path / "clean.mp4"))[0] == 0
    assert out.read_bytes() == (tmp_path / "clean.mp4").read_bytes()


# ------------------------------------------------------------------------------------------ 5. full disks

def test_5_quantize_on_a_full_disk_keeps_finished_units_and_resumes(capsys: pytest.CaptureFixture[str], dit_ckpt: Path,
                                                                    tmp_path: Path) -> None:
    assert _quantize(capsys, dit_ckpt, tmp_path / "clean")[0] == 0
    size = sum(len(b) for b in _files(tmp_path / "clean").values())
    with small_tmpfs(tmp_path / "disk", f"{size // 2 // 1024}k") as disk:
        code, err = _quantize(capsys, dit_ckpt, disk / "art")
        assert_one_line(code, err, "disk full", exit_code=2)
        assert "re-run" in err
        kept = [p for p in (disk / "art" / "units").iterdir()]
        assert kept and not [p for p in kept if p.name.startswith(".")]  # finished units, no temp file
        remount(disk, f"size={4 * size // 1024 + 1024}k")  # space freed
        assert _quantize(capsys, dit_ckpt, disk / "art")[0] == 0
        assert _files(disk / "art") == _files(tmp_path / "clean")


class _BigStateBackend:
    """FakeBackend whose renderer fills the disk when asked for its state (the checkpoint write)."""

    def __init__(self, disk: Path) -> None:
        from test_generate import FakeBackend

        self.inner, self.disk = FakeBackend(), disk

    def identity(self) -> str:
        return self.inner.identity()

    def build(self, inputs: Any) -> Any:
        renderer, disk = self.inner.build(inputs), self.disk
        real_state = renderer.state

        def state() -> dict:
            fill_disk(disk, leave=4096)  # the disk fills while the checkpoint is written
            return {**real_state(), "pad": torch.zeros(1 << 16)}

        renderer.state = state
        return renderer


def test_5_generate_checkpoint_and_mux_on_a_full_disk(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      media: Path) -> None:
    import liveavatar_lite.decode.video as video
    from test_generate import FakeBackend

    use_backend(monkeypatch, FakeBackend())
    assert run_cli(capsys, *_gen(tmp_path, media, tmp_path / "clean.mp4"))[0] == 0
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "o.mp4"
        use_backend(monkeypatch, _BigStateBackend(disk))
        code, err = run_cli(capsys, *_gen(tmp_path, media, out))
        assert_one_line(code, err, "disk full while writing", exit_code=1)
        assert "--resume" in err
        work = RenderWorkDir.path_for(out)
        assert not [p for p in work.iterdir() if p.name.endswith((".tmp", ".part"))]  # space given back
        (disk / ".filler").unlink()

        real_mux = video.mux_segments

        def mux_on_full_disk(*a: Any, **k: Any) -> int:
            fill_disk(disk, leave=2048)  # and again, just before the final mp4 is written
            return real_mux(*a, **k)

        use_backend(monkeypatch, FakeBackend())
        monkeypatch.setattr(video, "mux_segments", mux_on_full_disk)
        code, err = run_cli(capsys, *_gen(tmp_path, media, out, "--resume"))
        assert_one_line(code, err, "disk full while writing", exit_code=1)
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
        (disk / ".filler").unlink()
        monkeypatch.setattr(video, "mux_segments", real_mux)
        assert run_cli(capsys, *_gen(tmp_path, media, out, "--resume"))[0] == 0
        assert out.read_bytes() == (tmp_path / "clean.mp4").read_bytes()


def test_5_onnx_export_on_a_full_disk(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                      tiny_ckpt: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    """`vae export` on a full tmpfs: one line, no temp file, and after freeing space the same bytes as
    the artifact's decoder. The graph is traced once, by the artifact's conversion: here torch.onnx.export
    hands back that traced graph (tracing again costs a minute), and the rest of the export runs as is:
    metadata, the If-node check, the write to a temp file, the rename."""
    import onnx
    import torch

    traced = onnx.load(str(tiny_artifact / "vae" / "decoder.onnx"))
    del traced.metadata_props[:]

    class _Program:
        @property
        def model_proto(self) -> onnx.ModelProto:
            proto = onnx.ModelProto()
            proto.CopyFrom(traced)
            return proto

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _Program())
    size = (tiny_artifact / "vae" / "decoder.onnx").stat().st_size
    with small_tmpfs(tmp_path / "disk", f"{max(64, size // 2 // 1024)}k") as disk:
        code, err = run_cli(capsys, "vae", "export", tiny_ckpt, disk / "d.onnx", "--dtype", "fp16")
        assert_one_line(code, err, "disk full while writing", exit_code=1)
        assert sorted(os.listdir(disk)) == []  # no temp file left behind
        remount(disk, f"size={4 * size // 1024 + 1024}k")
        assert run_cli(capsys, "vae", "export", tiny_ckpt, disk / "d.onnx", "--dtype", "fp16")[0] == 0
        assert (disk / "d.onnx").read_bytes() == (tiny_artifact / "vae" / "decoder.onnx").read_bytes()


# ------------------------------------------------------------------------------------------ 6. FIFO shard, absurd config

@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [SHARD2, DIT_CONFIG, LORA_FILE])
def test_6_fifo_shard_is_refused_not_waited_on(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path,
                                               name: str) -> None:
    (dit_ckpt / name).unlink()
    os.mkfifo(dit_ckpt / name)
    code, err = _quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "is a FIFO (named pipe)", exit_code=2)


@pytest.mark.timeout(60)
def test_6_absurd_config_is_refused_up_front(capsys: pytest.CaptureFixture[str], dit_ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((dit_ckpt / DIT_CONFIG).read_text())
    cfg["num_layers"] = 10**6
    (dit_ckpt / DIT_CONFIG).write_text(json.dumps(cfg))
    t0 = time.monotonic()
    code, err = _quantize(capsys, dit_ckpt, tmp_path / "out")
    assert_one_line(code, err, "num_layers 1000000 is outside", exit_code=2)
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------------------------------ kill -9 and Ctrl-C

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "kill-9"])
def test_interrupted_render_resumes_byte_identical(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, media: Path, sig: int) -> None:
    from test_generate import FakeBackend

    out = tmp_path / "o.mp4"
    proc = _child(_gen(tmp_path, media, out), delay=0.1)
    _wait_for_clips(RenderWorkDir.path_for(out) / "journal.json", proc, 1)
    time.sleep(0.15)  # inside clip 1
    assert proc.poll() is None, "the render ended before it could be interrupted"
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    if sig == signal.SIGINT:
        assert code == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].endswith("interrupted (re-run the same command with --resume to "
                                                     "continue from the newest checkpoint)"), err
    assert not out.exists()
    proc = _child(_gen(tmp_path, media, out, "--resume"), delay=0.0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    use_backend(monkeypatch, FakeBackend())
    assert run_cli(capsys, *_gen(tmp_path, media, tmp_path / "clean.mp4"))[0] == 0
    assert out.read_bytes() == (tmp_path / "clean.mp4").read_bytes()
