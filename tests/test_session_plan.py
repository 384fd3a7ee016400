"""`plan` predicts a talk session's per-block latency and real-time factor (runtime/plan.TalkPrediction):
printed and in --json, for one GPU and for a pipeline of ranks; the wav2vec2 cost it adds is counted
from the model's shapes (checked against torch's FLOP counter)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from liveavatar_lite.cli import main as cli_main
from liveavatar_lite.config import PRESETS
from liveavatar_lite.runtime.costs import wav2vec_flops

PLAN = ["plan", "14b", "--format", "int8", "--size", "384*256", "--device-profile", "rtx4090", "--vram", "24",
        "--kv", "fp8", "--ram", "64"]
LINE = re.compile(r"talk +per-block latency ([\d.]+) s after its speech \+ 0.4 s lookahead arrive \(features ([\d.]+) "
                  r"\+ DiT ([\d.]+) \+ decode ([\d.]+)\), session real-time factor ([\d.]+)")


def _run(capsys: pytest.CaptureFixture, *extra: str) -> str:
    assert cli_main([*PLAN, *extra]) == 0
    return capsys.readouterr().out


def test_plan_prints_the_talk_latency(capsys: pytest.CaptureFixture) -> None:
    m = LINE.search(_run(capsys))
    assert m, "plan prints no talk latency"
    latency, features, dit, decode, rtf = map(float, m.groups())
    assert latency == pytest.approx(features + dit + decode, abs=0.011)
    assert rtf == pytest.approx(0.48 / latency, rel=0.02)  # one block after another on one GPU
    assert 0 < features < 0.1 * latency  # wav2vec2 is a small part of a block


def test_plan_json_talk_matches_the_plan(capsys: pytest.CaptureFixture) -> None:
    out = json.loads(_run(capsys, "--json"))
    talk = out["predicted_talk"]
    assert talk["dit_seconds"] == pytest.approx(out["predicted_seconds_per_clip"] / 4)
    assert talk["decode_seconds"] == pytest.approx(out["decode_seconds_per_clip"] / 4)
    assert talk["latency_seconds"] == pytest.approx(talk["features_seconds"] + talk["dit_seconds"] + talk["decode_seconds"])
    assert talk["block_video_seconds"] == pytest.approx(0.48) and talk["lookahead_seconds"] == 0.4


def test_plan_ranks_predicts_the_talk_latency_at_the_pipelines_pace(capsys: pytest.CaptureFixture) -> None:
    text = _run(capsys, "--ranks", "4")
    assert LINE.search(text) and "Pipeline.session runs on one GPU today" in text
    out = json.loads(_run(capsys, "--ranks", "4", "--json"))
    talk = out["predicted_talk"]
    assert talk["interval_seconds"] == pytest.approx(out["pipeline"]["seconds_per_clip"] / 4)
    assert talk["realtime_factor"] == pytest.approx(0.48 / talk["interval_seconds"])
    ranks = out["ranks"]  # the block crosses every rank
    assert talk["dit_seconds"] == pytest.approx(sum(r["dit_seconds_per_clip"] + r["handoff_seconds_per_clip"]
                                                    for r in ranks) / 4)


@pytest.mark.parametrize("preset", ["14b", "tiny"])
def test_wav2vec_flops_match_torchs_count(preset: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from liveavatar_lite.conditioning.audio_features import CONV_KERNEL, CONV_STRIDE

    c = PRESETS[preset].wav2vec
    cfg = Wav2Vec2Config(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                         num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                         conv_dim=list(c.conv_dim), conv_kernel=list(CONV_KERNEL), conv_stride=list(CONV_STRIDE),
                         conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                         num_conv_pos_embeddings=c.num_conv_pos_embeddings,
                         num_conv_pos_embedding_groups=c.num_conv_pos_embedding_groups)
    with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
        model = Wav2Vec2Model(cfg).eval()
        x = torch.zeros(1, int(4.88 * 16000))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    # measured: 0.3 % (14b), 2 % (tiny: its 32-channel front-end's first layer scales linearly)
    assert wav2vec_flops(4.88, c) == pytest.approx(counter.get_total_flops(), rel=0.05)
