"""`liveavatar-lite plan` and `bench stream` from the command line."""
from __future__ import annotations

import json

import pytest

from liveavatar_lite.cli import main


def test_plan_json_14b_preset(capsys):
    rc = main(["plan", "14b", "--format", "int8", "--vram", "24", "--ram", "64", "--device-profile", "rtx4090", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["peak_vram_bytes"] <= 22.5e9
    for key in ("host_ram_bytes", "h2d_bytes_per_clip", "predicted_seconds_per_clip", "units", "kv"):
        assert key in d
    assert {u["placement"] for u in d["units"]} <= {"gpu", "host", "disk"}
    assert [k["step"] for k in d["kv"]] == [0, 1, 2, 3, None]


def test_plan_table(capsys):
    assert main(["plan", "14b", "--format", "int4", "--vram", "12", "--ram", "64", "--kv", "fp8",
                 "--device-profile", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "streamed from pinned RAM" in out and "predicted" in out
    assert "vae working set" in out and "latent(s) per call" in out and "elementwise" in out
    assert "fused graphs (compile on), attention flash" in out and "text kv" in out  # auto on a GPU profile
    assert "predicted real-time factor" in out and "PCIe floor" in out and "not hidden by the DiT" in out


def test_plan_prices_the_chosen_kernels(capsys):
    """--compile and --attention reach the prediction; an attention backend the profile has no rate
    for is one line and exit 2."""
    from liveavatar_lite.commands import plan_cmd
    from liveavatar_lite.runtime import device_profiles

    assert plan_cmd.COMPILE_CHOICES == device_profiles.COMPILE_CHOICES
    assert plan_cmd.ATTENTION_CHOICES == device_profiles.ATTENTION_CHOICES
    assert plan_cmd.PROFILE_NAMES == tuple(device_profiles.PROFILES)  # --device-profile's help lists them all
    base = ["plan", "14b", "--format", "int8", "--kv", "fp8", "--vram", "24", "--ram", "64",
            "--device-profile", "rtx4090", "--json"]
    seconds = {}
    for extra in (["--compile", "off"], ["--compile", "on"], ["--compile", "on", "--attention", "sage"]):
        assert main(base + extra) == 0
        d = json.loads(capsys.readouterr().out)
        seconds[" ".join(extra)] = d["predicted_seconds_per_clip"]
        assert d["predicted_realtime_factor"] <= d["predicted_dit_realtime_factor"]
    assert seconds["--compile on"] < seconds["--compile off"]
    assert seconds["--compile on --attention sage"] < seconds["--compile on"]
    assert main(base[:-3] + ["--device-profile", "h100", "--attention", "sage"]) == 2
    err = capsys.readouterr().err
    assert "no rate for --attention sage" in err and err.count("\n") == 1


def test_plan_budget_error_exit_3(capsys):
    # int8 + bf16 KV needs 10.42 GB at the leanest (the text K/V's 0.42 GB included); fp8 KV 10.10 GB
    rc = main(["plan", "14b", "--format", "int8", "--vram", "10.3", "--ram", "64", "--device-profile", "rtx4090",
               "--compile", "off"])
    assert rc == 3
    err = capsys.readouterr().err
    assert err.startswith("liveavatar-lite plan: error:") and "smallest change that fits: --kv fp8" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv,msg", [
    (["plan", "14b", "--vram", "24"], "needs --format"),
    (["plan", "14b", "--format", "int8", "--vram", "24", "--size", "700*400"], "multiples of 16"),
    (["plan", "/nonexistent/art", "--vram", "24"], "no manifest.json"),
    (["plan", "14b", "--format", "int8", "--vram", "24", "--device-profile", "voodoo2"], "unknown device profile"),
])
def test_plan_bad_input_exit_2(capsys, argv, msg):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_plan_artifact(capsys, artifacts):
    rc = main(["plan", str(artifacts["int8"]), "--vram", "2", "--size", "64*64", "--device-profile", "rtx4090", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert {u["name"] for u in d["units"]} == {"resident", "block_000", "block_001", "block_002", "block_003"}


def test_bench_stream_runs_on_cpu(capsys):
    from bench_stream import main as bench_main

    assert bench_main(["--preset", "tiny", "--device", "cpu", "--blocks", "2", "--device-profile", "rtx4090",
                       "--samples", "1", "--warmup", "0"]) == 0  # one sample: this checks it runs, not its speed
    out = capsys.readouterr().out
    assert "copy_wait_weights_fraction" in out and "copy_wait_kv_fraction" in out
    assert "streamed / resident step time" in out and "memory ledger, streamed" in out and "host_buffers" in out


from test_runtime import artifacts  # noqa: E402,F401  (the tiny artifacts fixture)
