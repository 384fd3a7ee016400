"""`liveavatar-lite plan`: place weights and KV caches within a VRAM/RAM budget and predict speed.

    liveavatar-lite plan ARTIFACT --vram 24 [--ram 64] [--size 704*384] [--kv fp8] [--device-profile rtx4090] [--json]
    liveavatar-lite plan 14b --format int4 --vram 12      # no artifact needed: sizes from the config
    liveavatar-lite plan 14b --format int8 --vram 24 --ranks 5 --device-profile rtx4090   # a pipeline of 5 GPUs
    liveavatar-lite plan 14b --format int8 --kv fp8 --vram 24 --device-profile rtx4090 --compile off  # eager costs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import ATTENTION_CHOICES, COMPILE_CHOICES, PROFILE_NAMES, float_range, int_range

DESCRIPTION = (
    "Place the DiT's weight units and the five KV caches (4 per-step rings + the sink) on GPU, "
    "pinned host RAM or disk so that weights, KV, activations, staging slots, the VAE's ONNX Runtime "
    "arena and the CUDA context fit ONE VRAM budget; print the layout and the predicted seconds per "
    "clip. ARTIFACT is an artifact directory, or a preset name (14b, tiny) with --format to plan "
    "before converting. Sizes are decimal GB (1e9 bytes)."
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT", help="artifact directory, or a preset name: 14b | tiny")
    parser.add_argument("--vram", type=float_range(0.0, 1e6, lo_open=True), required=True, metavar="GB",
                        help="VRAM budget in GB (the one knob)")
    parser.add_argument("--ram", type=float_range(0.0, 1e6, lo_open=True), metavar="GB",
                        help="host RAM budget in GB (default: this machine's RAM less max(4 GB, 15 %%), left to the OS)")
    parser.add_argument("--size", default="704*384", metavar="W*H", help="video size (default 704*384)")
    parser.add_argument("--kv", default="bf16", choices=("bf16", "fp8", "int8"), help="KV cache storage dtype")
    parser.add_argument("--format", choices=("bf16", "int8", "fp8", "int4", "nf4"),
                        help="weight format when ARTIFACT is a preset name")
    parser.add_argument("--device-profile", metavar="NAME",
                        help=f"bandwidth/throughput figures: {', '.join(PROFILE_NAMES)} "
                             "(default: this GPU's profile if known, else a short probe)")
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                        help="price the units as fused graphs (on) or eager ops (off); auto: fused on a GPU "
                             "profile, as the runtime runs them (default auto)")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                        help="attention backend to price (auto: what the runtime picks on this GPU; sage: "
                             "8-bit SageAttention where the profile has its rate)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--ranks", type=int_range(1, 64), default=1, metavar="N",
                        help="plan a pipeline of N GPUs (generate --ranks N): each rank's layout within its own "
                             "--vram (only its own KV rings), the predicted throughput (the slowest rank sets "
                             "it) and real-time factor; --ram is the whole machine's, shared by the ranks")
    parser.add_argument("--split", choices=("auto", "steps", "layers"), default="auto",
                        help="with --ranks: steps (each rank whole steps, all layers), layers (each rank a range "
                             "of the layers for every step) or auto: plan both and keep the higher predicted "
                             "throughput, saying why (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..artifact.format import read_manifest
    from ..config import PRESETS
    from ..decode.decoder_memory import DecoderGraph
    from ..errors import UserError
    from ..pipeline.memory import decoder_graph, host_budget_bytes
    from ..runtime.device_profiles import resolve_profile
    from ..runtime.plan import GB, Budget, make_plan
    from ..runtime.plan_inputs import manifest_unit_sizes, parse_size, plan_input

    size = parse_size(args.size)
    if args.vram <= 0 or (args.ram is not None and args.ram <= 0):
        raise UserError("--vram and --ram must be positive numbers of GB")
    if args.artifact in PRESETS:
        if not args.format:
            raise UserError(f"planning preset {args.artifact!r} needs --format (e.g. --format int8)")
        # the decoder's memory from the stored shapes of the preset's exported graph
        inp = plan_input(PRESETS[args.artifact].dit, size, args.format, decoder=DecoderGraph.for_preset(args.artifact))
    else:
        if args.format:
            raise UserError("--format is only for preset names; an artifact's format is in its manifest")
        m = read_manifest(Path(args.artifact))
        inp = plan_input(m.dit, size, m.quant.format, unit_sizes=manifest_unit_sizes(m),
                         decoder=decoder_graph(Path(args.artifact), m))
    ram = host_budget_bytes(args.ram * GB / 1e9 if args.ram is not None else None)  # the OS keeps its share
    profile, note = resolve_profile(args.device_profile)
    budget = Budget(vram_bytes=args.vram * GB, ram_bytes=ram, kv_dtype=args.kv, compile=args.compile,
                    attention=args.attention)
    if args.ranks == 1 and args.split != "auto":
        raise UserError(f"--split {args.split} divides the work of --ranks N (N >= 2) GPUs")
    if args.ranks != 1:
        print(_pipeline_report(inp, budget, profile, args.ranks, args.json, ram, args.split))
        if note and not args.json:
            print(note)
        return 0
    plan = make_plan(inp, budget, profile)
    talk = talk_prediction(inp, profile, plan.predicted_seconds_per_clip, plan.decode_seconds_per_clip)
    if args.json:
        print(json.dumps({**plan.to_json(), "predicted_clip_seconds": plan.clip_seconds,
                          "predicted_realtime_factor": predicted_realtime_factor(plan),
                          "predicted_dit_realtime_factor": predicted_realtime_factor(plan, dit_only=True),
                          "predicted_talk": talk.to_json()}, indent=1))
    else:
        print(format_plan(plan, ram))
        print(talk.describe())
        if note:
            print(note)
    return 0


def talk_prediction(inp, profile, dit_seconds_per_clip: float, decode_seconds_per_clip: float,
                    interval_seconds_per_clip: float | None = None):
    """A talk session's per-block latency and real-time factor (runtime/plan.TalkPrediction) at the
    session's default window (conditioning/streaming_features.StreamingWindow: context + block + lookahead)."""
    from ..conditioning.streaming_features import StreamingWindow
    from ..runtime.plan import predict_talk

    w = StreamingWindow()
    block_s = inp.sample.block_seconds
    return predict_talk(inp, profile, dit_seconds_per_clip, decode_seconds_per_clip,
                        w.context_s + block_s + w.lookahead_s, w.lookahead_s, interval_seconds_per_clip)


def predicted_realtime_factor(plan, dit_only: bool = False) -> float:
    """Seconds of video per second of wall time the plan predicts (a clip is 48 frames at 25 fps):
    the DiT and the decoder time it does not hide, or (`dit_only`) the DiT alone."""
    from ..config import SampleConfig

    sample = SampleConfig()
    return sample.infer_frames / sample.fps / (plan.predicted_seconds_per_clip if dit_only else plan.clip_seconds)


def format_plan(plan, ram_budget: float | None) -> str:
    """The human-readable plan table."""
    from ..runtime.plan import GB

    gb = lambda b: f"{b / GB:8.2f}"  # noqa: E731
    w, h = plan.size
    kv_dtype = plan.kv[0].dtype if plan.kv else "-"
    lines = [f"plan: {plan.weight_format} weights, {w}*{h}, KV {kv_dtype}, profile {plan.device_profile}", "",
             f"{'VRAM':<32}GB"]
    for k, v in plan.breakdown.items():
        lines.append(f"  {k.replace('_', ' '):<24}{gb(v)}")
    lines.append(f"  {'peak':<24}{gb(plan.peak_vram_bytes)}   of {plan.vram_budget_bytes / GB:.2f} GB budget")
    lines += ["", f"{'weight units':<36}GB"]
    for where, label in (("gpu", "resident on GPU"), ("host", "streamed from pinned RAM"), ("disk", "streamed from disk")):
        us = [u for u in plan.units if u.placement == where]
        if us:
            lines.append(f"  {len(us):3d} {label:<24}{gb(sum(u.nbytes for u in us))}")
    streamed = [u.name for u in plan.units if u.placement != "gpu"]
    if streamed:
        lines.append(f"      streamed: {', '.join(streamed)}")
    lines += ["", f"{'KV caches':<36}GB   where"]
    for k in plan.kv:
        label = f"{k.name} ({'sink, all steps' if k.step is None else f'step {k.step}'})"
        lines.append(f"  {label:<28}{gb(k.nbytes)}   {k.placement}")
    ram = f" of {ram_budget / GB:.1f} GB" if ram_budget else ""
    host = ", ".join(f"{k.replace('_', ' ')} {v / GB:.1f}" for k, v in plan.host_breakdown.items())
    causes = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in plan.seconds_breakdown.items())
    lines += ["", f"host RAM    {plan.host_ram_bytes / GB:.1f} GB{ram} ({host}; pinned buffers at their exact size)",
              (f"decoder     {plan.decode_latents_per_call or '-'} latent(s) per call, ONNX Runtime arena cap "
               f"{plan.decoder_arena_bytes / GB:.2f} GB (weights + working set + workspace, from the graph's shapes)"),
              f"kernels     {plan.kernels}",
              (f"per clip    H2D {plan.h2d_bytes_per_clip / GB:.1f} GB (PCIe floor {plan.pcie_floor_seconds_per_clip:.1f} s), "
               f"predicted {plan.predicted_seconds_per_clip:.1f} s "
               f"(DiT only, 4 steps x 4 blocks, 48 frames: {causes})"),
              (f"decoder     {plan.decode_seconds_per_clip:.1f} s per clip on this GPU, "
               f"{plan.decode_exposed_seconds_per_clip:.1f} s of it not hidden by the DiT: "
               f"{plan.clip_seconds:.1f} s per clip in all"),
              (f"real time  predicted real-time factor {predicted_realtime_factor(plan):.3f} "
               f"(DiT alone {predicted_realtime_factor(plan, dit_only=True):.3f}; seconds of video per second "
               f"of rendering, 1.0 = as fast as it plays; predictions)")]
    return "\n".join(lines)


def _pipeline_report(inp, budget, profile, ranks: int, as_json: bool, ram_budget: float | None,
                     split: str = "auto") -> str:
    """`plan --ranks N`: every rank's plan, the pipeline's throughput (the split asked, or with auto
    the faster one and why), one GPU for comparison."""
    from ..errors import BudgetError
    from ..runtime.stage_plan import (plan_ranks, plan_split, predict_pipeline, rank_roles,
                                      vae_decode_seconds_per_clip, work_bound)

    choice = plan_split(inp, budget, profile, ranks, split)
    plans, pred = choice.plans, choice.prediction
    try:
        single = predict_pipeline(plan_ranks(inp, budget, profile, rank_roles(1)), inp.sample)
    except BudgetError:
        single = None
    bound = work_bound(inp, budget, profile)
    # a talk session's block crosses every rank (DiT and hand-offs), then the decode runs in full;
    # while speech keeps coming, blocks follow each other at the pipeline's pace (its slowest rank)
    talk = talk_prediction(inp, profile, sum(p.dit_seconds_per_clip + p.handoff_seconds_per_clip for p in plans),
                           vae_decode_seconds_per_clip(inp, profile), pred.seconds_per_clip)
    if as_json:
        return json.dumps({"split": choice.split, "why": choice.reason, "ranks": [p.to_json() for p in plans],
                           "pipeline": pred.to_json(), "other_split": choice.other.to_json() if choice.other else None,
                           "one_gpu": single.to_json() if single else None, "predicted_talk": talk.to_json(),
                           "work_bound": {"work_seconds_per_clip": bound.work_seconds_per_clip,
                                          "realtime_factor": bound.realtime_factor(ranks),
                                          "cards_for_real_time": bound.cards_for_real_time}}, indent=1)
    text = format_pipeline(plans, pred, single, ram_budget)
    return (text + f"\nsplit       {choice.split}: {choice.reason}"
            + f"\nbound       any split over {ranks} such cards: at most {bound.realtime_factor(ranks):.2f}x real time "
            f"(all of a clip's compute, {bound.work_seconds_per_clip:.2f} s on one card, shared perfectly, no copies); "
            f"{bound.cards_for_real_time} cards reach 1.0x at best"
            f"\n{talk.describe()} [a session on this pipeline: Pipeline.session runs on one GPU today]")


def format_pipeline(plans, pred, single, ram_budget: float | None) -> str:
    """The human-readable pipeline table (one line per rank)."""
    from ..runtime.plan import GB

    first = next(p.plan for p in plans if p.plan is not None)
    w, h = first.size
    split = "layer" if any(p.role.layers is not None for p in plans) else "step"
    title = (f"pipeline plan: {len(plans)} ranks ({split} split), {first.weight_format} weights, {w}*{h}, KV {first.kv[0].dtype}, "
             f"profile {first.device_profile}, {first.kernels} (predictions)")
    header = (f"{'rank':<5}{'role':<24}{'peak GB':>8}{'budget':>8}  {'resident/streamed':<18}{'KV caches':<30}"
              f"{'host GB':>8}{'s/clip':>8}")
    lines = [title, "", header]
    for p in plans:
        if p.plan is None:
            layout, kv = "(no DiT)", "VAE decoder only"
        else:
            streamed = len(p.plan.streamed_units)
            layout = f"{len(p.plan.units) - streamed} / {streamed}"
            kv = _kv_places(p.plan.kv)
        lines.append(f"{p.role.rank:<5}{p.role.label:<24}{p.peak_vram_bytes / GB:8.2f}{p.vram_budget_bytes / GB:8.2f}  "
                     f"{layout:<18}{kv:<30}{p.host_ram_bytes / GB:8.1f}{p.seconds_per_clip:8.2f}")
    host = sum(p.host_ram_bytes for p in plans)
    ram = f" of {ram_budget / GB:.1f} GB" if ram_budget else ""
    slow = plans[pred.slowest_rank]
    throughput = (f"throughput  one clip per {pred.seconds_per_clip:.2f} s (rank {pred.slowest_rank}, "
                  f"{slow.role.label}, is the slowest) = {pred.fps:.1f} fps, {pred.realtime_factor:.2f}x real time "
                  f"(25 fps); first clip {pred.first_clip_seconds:.2f} s")
    lines += ["", f"host RAM    {host / GB:.1f} GB{ram} for all ranks together",
              "per rank    s/clip = DiT (+ VAE decode on the decoding rank) + hand-off, per 48-frame clip",
              throughput]
    if single is not None:
        lines.append(f"one GPU     {single.seconds_per_clip:.2f} s per clip = {single.fps:.1f} fps "
                     f"({pred.fps / single.fps:.1f}x with {len(plans)} ranks)")
    else:
        lines.append("one GPU     does not fit this budget")
    return "\n".join(lines)


def _kv_places(kv) -> str:
    """'ring.0:host, sink:gpu'; a rank with all its caches in one place: 'all 5 on gpu'."""
    places = {k.placement for k in kv}
    if len(kv) > 2 and len(places) == 1:
        return f"all {len(kv)} on {places.pop()}"
    return ", ".join(f"{k.name}:{k.placement}" for k in kv)
