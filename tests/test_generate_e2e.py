"""End to end on CPU: tiny checkpoint -> quantize -> generate 3 clips -> mp4; kill -9 + --resume; bad artifacts.

The renders run as `liveavatar-lite` subprocesses with OMP_NUM_THREADS=1, exactly as a user runs
them, so the uninterrupted and the resumed render see identical thread counts (bit-identical math).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")
pytest.importorskip("onnxruntime")

from media_fixtures import decoded_frames  # noqa: E402
from render_helpers import PROMPT, SIZE, cli_command, generate_args, render_env  # noqa: E402

from liveavatar_lite.artifact.format import MANIFEST_FILE  # noqa: E402
from liveavatar_lite.cli import main as cli_main  # noqa: E402
from liveavatar_lite.conditioning.caches import PromptCache  # noqa: E402
from liveavatar_lite.pipeline.workdir import RenderWorkDir  # noqa: E402


def test_end_to_end_three_clips_h264_25fps_with_aac(clean_render: dict, media: Path, tiny_artifact: Path) -> None:
    out = clean_render["out"]
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.average_rate == 25
        assert (v.codec_context.width, v.codec_context.height) == (64, 64)
        assert v.frames == 45 + 48 + 48
        assert a.codec_context.name == "aac"
        video_s, audio_s = float(v.duration * v.time_base), float(a.duration * a.time_base)
    assert abs(video_s - 141 / 25) < 1e-6
    assert abs(audio_s - video_s) <= 1 / 25
    frames = decoded_frames(out)
    assert frames.shape == (141, 64, 64, 3) and frames.std() > 1  # decoded pixels, not a blank video
    records = [json.loads(line) for line in clean_render["telemetry"].read_text().splitlines()]
    assert [r["frames"] for r in records if r["event"] == "clip"] == [45, 48, 48]
    assert records[-1]["event"] == "summary" and records[-1]["frames"] == 141
    assert all(r["host_rss_bytes"] > 0 and r["seconds"] > 0 for r in records if r["event"] == "clip")
    assert not RenderWorkDir.path_for(out).exists()
    # the prompt is cached (other tests may have cached other prompts in the shared media's cache)
    artifact_id = hashlib.sha256((tiny_artifact / MANIFEST_FILE).read_bytes()).hexdigest()
    assert PromptCache(media / "cache").path(PROMPT, artifact_id).is_file()
    print(f"\nend-to-end render of 3 clips (tiny model, {SIZE}, CPU): {clean_render['wall']:.1f} s wall")


def test_kill_9_then_resume_gives_identical_frames(clean_render: dict, tiny_artifact: Path, media: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "resumed.mp4"
    journal = RenderWorkDir.path_for(out) / "journal.json"
    proc = subprocess.Popen(cli_command(*generate_args(tiny_artifact, media, out)), env=render_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["segments"]) >= 1:
                break  # clip 0 is durable; the process is now inside clip 1
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    time.sleep(0.05)  # land inside clip 1 (a tiny clip takes seconds on CPU)
    assert proc.poll() is None, "the render finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing that looks finished
    assert len(json.loads(journal.read_text())["segments"]) in (1, 2)
    resumed = subprocess.run(cli_command(*generate_args(tiny_artifact, media, out, "--resume")), env=render_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after" in resumed.stderr
    assert np.array_equal(decoded_frames(out), decoded_frames(clean_render["out"]))


def _layout_budgets(art: Path) -> tuple[float, float]:
    """(the leanest --vram that `plan` accepts, one between it and the all-resident layout), in GB."""
    from liveavatar_lite.artifact.format import read_manifest
    from liveavatar_lite.pipeline.memory import decoder_graph
    from liveavatar_lite.runtime.device_profiles import get_profile
    from liveavatar_lite.runtime.plan import Budget, make_plan, min_vram_bytes
    from liveavatar_lite.runtime.plan_inputs import manifest_unit_sizes, plan_input

    m = read_manifest(art)
    inp = plan_input(m.dit, (64, 64), m.quant.format, unit_sizes=manifest_unit_sizes(m), decoder=decoder_graph(art, m))
    lean = math.ceil(min_vram_bytes(inp, Budget(1)) / 1e4) / 1e5  # GB, rounded up to 10 kB
    full = make_plan(inp, Budget(1e15), get_profile("rtx4090")).peak_vram_bytes / 0.93 / 1e9
    return lean, round((lean + full) / 2, 5)


@pytest.fixture(scope="module")
def budget_renders(tiny_artifact: Path, media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2-clip renders on this CPU under the leanest budget `plan` accepts and one between the extremes:
    `generate --vram` plans exactly as `plan --vram` does for a GPU of that size and runs the layout."""
    root = tmp_path_factory.mktemp("budgets")
    lean, mid = _layout_budgets(tiny_artifact)
    out = {}
    for name, gb in (("lean", lean), ("mid", mid)):
        mp4, tel = root / f"{name}.mp4", root / f"{name}.jsonl"
        args = generate_args(tiny_artifact, media, mp4, "--num-clip", "2", "--vram", str(gb),
                              "--device-profile", "rtx4090", "--telemetry", str(tel), "-v")
        proc = subprocess.run(cli_command(*args), env=render_env(), capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = {"out": mp4, "vram": gb, "stderr": proc.stderr,
                     "records": [json.loads(line) for line in tel.read_text().splitlines()]}
    return out


def test_streamed_layouts_on_cpu_write_the_resident_frames(budget_renders: dict, clean_render: dict,
                                                           tiny_artifact: Path, capsys) -> None:
    """The product's streamed path runs on CPU: under the leanest budget every unit streams through the
    two slots and every KV cache lives on the "host"; under a middle budget some of each; both write
    exactly the frames of the all-resident render. Telemetry records the layout, which is `plan`'s."""
    want = decoded_frames(clean_render["out"])[:45 + 48]
    for name, run in budget_renders.items():
        assert np.array_equal(decoded_frames(run["out"]), want), name
        layout = next(r for r in run["records"] if r["event"] == "layout")
        assert cli_main(["plan", str(tiny_artifact), "--vram", str(run["vram"]), "--size", SIZE,
                         "--device-profile", "rtx4090", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert layout["units_streamed"] == [u["name"] for u in plan["units"] if u["placement"] != "gpu"]
        assert layout["kv_placement"] == {k["name"]: k["placement"] for k in plan["kv"]}
        assert layout["predicted_h2d_bytes_per_clip"] == plan["h2d_bytes_per_clip"]
    lean, mid = (next(r for r in budget_renders[n]["records"] if r["event"] == "layout") for n in ("lean", "mid"))
    assert len(lean["units_streamed"]) == 4 and set(lean["kv_placement"].values()) == {"host"}  # all that can
    assert 0 < len(mid["units_streamed"]) + list(mid["kv_placement"].values()).count("host") < 4 + 5  # a mix
    resident = next(r for r in json.loads("[" + ",".join(clean_render["telemetry"].read_text().splitlines()) + "]")
                    if r["event"] == "layout")
    assert resident["units_streamed"] == [] and set(resident["kv_placement"].values()) == {"gpu"}


def test_memory_ledger_on_cpu(budget_renders: dict) -> None:
    """Per clip, the plan's figures next to the measured ones: on a CPU every part the runtime and the
    decoder allocate themselves matches to the byte, the host buffers are exact (no power-of-two
    rounding), the copy-wait is split into weights and KV, and a clip moves the bytes the plan says."""
    run = budget_renders["lean"]
    clips = [r for r in run["records"] if r["event"] == "clip"]
    assert len(clips) == 2
    for r in clips:
        ledger = r["ledger"]
        for item in ("resident_weights", "weight_slots", "gpu_kv", "kv_slots", "vae_caches", "host_buffers",
                     "host_pinned_weights", "host_pinned_kv"):
            assert ledger[item]["predicted"] == ledger[item]["measured"], item
        assert ledger["host_rss_peak"]["measured"] > 0 and ledger["seconds"]["measured"] == pytest.approx(r["seconds"], abs=1e-3)
        assert r["copy_wait_weights_s"] > 0 and r["copy_wait_kv_s"] > 0
        assert ledger["copy_wait_kv_s"]["measured"] == r["copy_wait_kv_s"]
    h2d = clips[1]["ledger"]["h2d_bytes"]  # clip 1: no sink prefill, the steady state the plan predicts
    assert h2d["measured"] == h2d["predicted"]
    assert "memory ledger, clip 1 (plan vs measured)" in run["stderr"]  # printed per clip with --telemetry -v


def test_artifact_decoder_graph_is_the_stored_tiny_graph(tiny_artifact: Path) -> None:
    """tools/decoder_graph.py stores what quantize exports: the tiny preset's stored graph is the
    artifact's (so the stored 14B graph `plan 14b` sizes the decoder with is the 14B export's)."""
    from liveavatar_lite.decode.decoder_memory import DecoderGraph

    got = DecoderGraph.from_onnx(tiny_artifact / "vae" / "decoder.onnx")
    assert got.to_json() == DecoderGraph.for_preset("tiny").to_json()


@pytest.mark.gpu
def test_gpu_render_reports_vram_and_copy_wait(clean_render: dict) -> None:
    records = [json.loads(line) for line in clean_render["telemetry"].read_text().splitlines()]
    clips = [r for r in records if r["event"] == "clip"]
    assert all(r["peak_vram_bytes"] and r["peak_vram_bytes"] > 0 for r in clips)
    assert all(r["copy_wait_fraction"] is not None and 0 <= r["copy_wait_fraction"] <= 1 for r in clips)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main(args)
    return rc, capsys.readouterr().err


def _edited_copy(artifact: Path, dest: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of `artifact` at `dest` whose manifest `edit` changed in place."""
    shutil.copytree(artifact, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_artifact_of_another_format_version_is_refused(tiny_artifact: Path, media: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    art = _edited_copy(tiny_artifact, tmp_path / "art", lambda m: m.update(format_version=99))
    rc, err = _run_cli(generate_args(art, media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "unknown format version 99" in err and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists()


def test_artifact_of_another_model_is_refused(tiny_artifact: Path, media: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    art = _edited_copy(tiny_artifact, tmp_path / "art",
                       lambda m: m["dit"].update(num_layers=3, audio_inject_layers=[0, 2]))
    rc, err = _run_cli(generate_args(art, media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "not a model this runtime knows" in err and err.count("\n") == 1


def test_missing_artifact_and_not_an_artifact(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_cli(generate_args(tmp_path / "nope", media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "manifest.json" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    rc, err = _run_cli(generate_args(tmp_path / "junk", media, tmp_path / "o.mp4"), capsys)
    assert rc == 2 and "corrupt" in err


def test_budget_too_small_names_the_plan_suggestion(tiny_artifact: Path, media: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_cli(generate_args(tiny_artifact, media, tmp_path / "o.mp4", "--vram", "0.001"), capsys)
    assert rc == 3 and "do not fit" in err and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.mp4.tmp").exists()


@pytest.mark.parametrize("kind", ["silent", "corrupt-image", "bad-size"])
def test_bad_media_through_the_cli(tiny_artifact: Path, media: Path, tmp_path: Path, kind: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "media"
    shutil.copytree(media, local, ignore=shutil.ignore_patterns("cache"))
    extra: list[str] = []
    if kind == "silent":
        sf.write(str(local / "speech.wav"), np.zeros((16000, 1), np.float32), 16000)
    elif kind == "corrupt-image":
        (local / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    else:
        extra = ["--size", "10*10"]
    args = generate_args(tiny_artifact, local, tmp_path / "o.mp4")
    if extra:
        args[args.index("--size") + 1] = extra[1]
    rc, err = _run_cli(args, capsys)
    assert rc == 2 and err.startswith("liveavatar-lite generate: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists()
