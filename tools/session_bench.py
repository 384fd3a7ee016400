"""Talk sessions measured (issue 27): streaming features and frames against a render, and per-block latency.

    OMP_NUM_THREADS=1 python tools/session_bench.py --artifact ART --photo P.png --speech S.wav --size 64*64

Prints markdown tables (BENCHMARKS.md, "Issue 27"):

1. Chunked feeding: for each chunk size the speech is fed in pieces; after each piece the blocks
   ready are rendered (`next_block(timeout=0)`), the last piece comes with `end()`. Per chunk size:
   the feature difference of the blocks that rendered from streaming features (against the whole
   file's features: max abs, max abs / max |whole|), and the frame difference against `stream()`
   of the same inputs (max abs, mean abs, PSNR). The reference row: the whole file fed, then end().
   A "silence" row puts the frame difference in scale: the same session fed nothing (idle blocks,
   silence features) against the speech's frames: what the audio changes at all.
2. The lookahead swept at one chunk size (the knob that sets both the error and the latency floor).
3. Latency: the speech fed from a thread at real-time pace in pieces of each chunk size while this
   thread iterates; per-block latency (mean, p50, p95, max) and the blocks' render time.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def frame_diff(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    d = np.abs(ref.astype(np.int16) - got.astype(np.int16))
    return {"frame_max_abs": int(d.max()), "frame_mean_abs": round(float(d.mean()), 4), "psnr_db": round(_psnr(ref, got), 2)}


def lockstep(pipe, kw: dict, wave: np.ndarray, chunk_s: float | None, n_blocks: int, **session_kw) -> list:
    """Blocks of a session fed `wave` in pieces of chunk_s (None: all at once), ready blocks drained
    after each piece, end() with the last piece."""
    sess = pipe.session(**kw, idle="pause", **session_kw)
    blocks = []
    try:
        step = len(wave) if chunk_s is None else max(1, int(round(chunk_s * 16000)))
        for i in range(0, len(wave), step):
            sess.feed(wave[i:i + step], 16000)
            if i + step >= len(wave):
                sess.end()
            while (b := sess.next_block(timeout=0)) is not None:
                blocks.append(b)
        while len(blocks) < n_blocks:
            blocks.append(sess.next_block())
    finally:
        sess.close()
    return blocks


def feature_diff(encoder, wave: np.ndarray, blocks: list, window) -> dict[str, float | int]:
    """Streaming against whole-file features, over the blocks that rendered from streaming ones; and
    against the whole file's wav2vec2 states re-timed with the streaming (nominal) scale, which
    leaves only the window's effect (normalisation so far, attention over context + lookahead)."""
    import torch

    from liveavatar_lite.conditioning.audio_features import (
        _hidden_states_window,
        extract_audio_features,
        normalize_waveform,
        wav2vec_frame_count,
    )
    from liveavatar_lite.conditioning.streaming_features import _nominal_taps, streaming_block_features

    whole = extract_audio_features(encoder, wave)
    k_stream = [i for i, b in enumerate(blocks) if b.features == "streaming"]
    if not k_stream:
        return {"streaming_blocks": 0, "feat_max_abs": 0.0, "feat_max_rel": 0.0, "feat_mean_abs": 0.0,
                "feat_window_max_rel": 0.0}
    h = _hidden_states_window(encoder, normalize_waveform(encoder, wave), 0, wav2vec_frame_count(len(wave)))
    diffs, window_diffs = [], []
    for k in k_stream:
        s = streaming_block_features(encoder, wave, 12 * k, 12 * k + 12, window)
        diffs.append((s - whole[..., 12 * k: 12 * k + 12]).abs())
        lo, hi, lam = _nominal_taps(12 * k, 12 * k + 12, 25)
        lam_t = torch.from_numpy(lam)
        timed = (h[:, np.minimum(lo, h.shape[1] - 1)] * (1 - lam_t)[None, :, None]
                 + h[:, np.minimum(hi, h.shape[1] - 1)] * lam_t[None, :, None]).transpose(1, 2)
        window_diffs.append(float((s - timed).abs().max()))
    d = torch.cat([x.flatten() for x in diffs])
    scale = float(whole.abs().max())
    return {"streaming_blocks": len(k_stream), "feat_max_abs": round(float(d.max()), 5),
            "feat_max_rel": round(float(d.max()) / scale, 5), "feat_mean_abs": round(float(d.mean()), 6),
            "feat_window_max_rel": round(max(window_diffs) / scale, 5)}


def realtime(pipe, kw: dict, wave: np.ndarray, chunk_s: float, n_blocks: int) -> dict:
    """Feed at real-time pace from a thread in pieces of chunk_s; iterate here; per-block latency."""
    sess = pipe.session(**kw, idle="pause")
    step = int(round(chunk_s * 16000))

    def feeder() -> None:
        t0 = time.monotonic()
        for i in range(0, len(wave), step):
            due = t0 + i / 16000 + chunk_s  # a piece is fed when its last sample has been "spoken"
            time.sleep(max(0.0, due - time.monotonic()))
            sess.feed(wave[i:i + step], 16000)
        sess.end()

    th = threading.Thread(target=feeder)
    th.start()
    blocks, render_s = [], []
    try:
        while len(blocks) < n_blocks:
            t = time.perf_counter()
            blocks.append(sess.next_block())
            render_s.append(time.perf_counter() - t)
    finally:
        th.join()
        sess.close()
    from liveavatar_lite.pipeline.session import latency_stats

    lat = [b.latency_s for b in blocks if b.latency_s is not None]
    return {"chunk_ms": int(chunk_s * 1000), **latency_stats(lat),
            "streaming_blocks": sum(b.features == "streaming" for b in blocks), "blocks": len(blocks),
            "render_mean_s": round(float(np.mean(render_s)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--photo", required=True)
    ap.add_argument("--speech", required=True)
    ap.add_argument("--size", default="64*64")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--chunks", default="0.02,0.1,0.5,2.0")
    ap.add_argument("--lookaheads", default="0.2,0.4,0.8")
    ap.add_argument("--realtime-chunks", default="0.02,0.1,0.5")
    ap.add_argument("--contexts", default="0,1,4",
                    help="context_s values whose window-only feature difference is printed (no rendering)")
    ap.add_argument("--features-only", action="store_true", help="only the context table (seconds, no renders)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from liveavatar_lite import Pipeline
    from liveavatar_lite.conditioning.speech import load_audio
    from liveavatar_lite.conditioning.streaming_features import StreamingWindow

    if args.features_only:
        context_table(args)
        return
    pipe = Pipeline.from_artifact(args.artifact, cache_dir=args.cache_dir, size=args.size, progress=False)
    kw = dict(image=args.photo, prompt="a person talking to the camera", size=args.size, seed=args.seed)
    ref = list(pipe.stream(audio=args.speech, **kw))
    ref_frames = np.concatenate([b.frames for b in ref])
    n = len(ref)
    wave = load_audio(args.speech)
    encoder = pipe.backend._audio_encoder()
    report: dict = {"blocks": n, "speech_s": round(len(wave) / 16000, 3), "chunks": [], "lookahead": [], "realtime": []}

    # the audio's own effect: idle (silence-feature) blocks against the speech's frames
    sess = pipe.session(**kw, idle="listen")
    silent, spent = [], []
    for _ in range(n):
        t = time.perf_counter()
        silent.append(sess.next_block())
        spent.append(time.perf_counter() - t)
    sess.close()
    report["idle_render_s"] = round(float(np.mean(spent[1:])), 3)  # paced: includes waits when faster than real time
    report["silence"] = frame_diff(ref_frames, np.concatenate([b.frames for b in silent]))

    window = StreamingWindow()
    for c in [None, *(float(x) for x in args.chunks.split(","))]:
        blocks = lockstep(pipe, kw, wave, c, n)
        from liveavatar_lite.pipeline.session import latency_stats

        streaming_lat = [b.latency_s for b in blocks if b.features == "streaming"]
        row = {"chunk_ms": "whole" if c is None else int(c * 1000),
               **feature_diff(encoder, wave, blocks, window),
               **frame_diff(ref_frames, np.concatenate([b.frames for b in blocks])),
               "lockstep_streaming_latency": latency_stats(streaming_lat),
               "lockstep_all_latency": latency_stats([b.latency_s for b in blocks])}
        report["chunks"].append(row)
        print(json.dumps(row), flush=True)
    for la in (float(x) for x in args.lookaheads.split(",")):
        w = StreamingWindow(lookahead_s=la)
        blocks = lockstep(pipe, kw, wave, 0.1, n, lookahead_s=la)
        row = {"lookahead_s": la, **feature_diff(encoder, wave, blocks, w),
               **frame_diff(ref_frames, np.concatenate([b.frames for b in blocks]))}
        report["lookahead"].append(row)
        print(json.dumps(row), flush=True)
    for c in (float(x) for x in args.realtime_chunks.split(",")):
        row = realtime(pipe, kw, wave, c, n)
        report["realtime"].append(row)
        print(json.dumps(row), flush=True)

    print("\n| chunk | blocks from streaming features | feature max abs | feature max rel | window only: max rel "
          "| frame max abs | frame mean abs | PSNR dB |\n|---|---|---|---|---|---|---|---|")
    for r in report["chunks"]:
        name = "whole file, then end()" if r["chunk_ms"] == "whole" else f"{r['chunk_ms']} ms"
        print(f"| {name} | {r['streaming_blocks']} / {n} | {r['feat_max_abs']} | {r['feat_max_rel']} | "
              f"{r['feat_window_max_rel']} | {r['frame_max_abs']} | {r['frame_mean_abs']} | {r['psnr_db']} |")
    s = report["silence"]
    print(f"| (scale) silence features vs the speech | - | - | - | - | {s['frame_max_abs']} | {s['frame_mean_abs']} | "
          f"{s['psnr_db']} |")
    print("\n| chunk (fed as the renderer takes it) | streaming blocks: latency mean s | max s | "
          "all blocks: latency mean s | max s |\n|---|---|---|---|---|")
    for r in report["chunks"]:
        a, b = r["lockstep_streaming_latency"], r["lockstep_all_latency"]
        name = "whole file, then end()" if r["chunk_ms"] == "whole" else f"{r['chunk_ms']} ms"
        print(f"| {name} | {a['latency_mean_s']} | {a['latency_max_s']} | {b['latency_mean_s']} | {b['latency_max_s']} |")
    print("\n| lookahead | blocks from streaming features | feature max abs | feature max rel | window only: max rel "
          "| frame max abs | frame mean abs | PSNR dB |\n|---|---|---|---|---|---|---|---|")
    for r in report["lookahead"]:
        print(f"| {r['lookahead_s']} s | {r['streaming_blocks']} / {n} | {r['feat_max_abs']} | {r['feat_max_rel']} | "
              f"{r['feat_window_max_rel']} | {r['frame_max_abs']} | {r['frame_mean_abs']} | {r['psnr_db']} |")
    print("\n| chunk (fed at real time) | blocks | from streaming features | latency mean s | p50 s | p95 s | max s "
          "| next_block() mean s |\n|---|---|---|---|---|---|---|---|")
    for r in report["realtime"]:
        print(f"| {r['chunk_ms']} ms | {r['blocks']} | {r['streaming_blocks']} | {r['latency_mean_s']} | "
              f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['latency_max_s']} | {r['render_mean_s']} |")
    print(f"\nblock render alone (idle blocks, no features): mean {report['idle_render_s']} s")
    context_table(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def context_table(args: argparse.Namespace) -> None:
    """Window-only feature difference (every block the speech allows) for each context_s."""
    from types import SimpleNamespace

    from liveavatar_lite.artifact.format import read_manifest
    from liveavatar_lite.conditioning.audio_features import load_wav2vec
    from liveavatar_lite.conditioning.speech import load_audio
    from liveavatar_lite.conditioning.streaming_features import StreamingWindow, samples_needed

    art = Path(args.artifact)
    encoder = load_wav2vec(art / read_manifest(art).paths["audio_dir"])
    wave = load_audio(args.speech)
    print("\n| context_s | blocks | window only: max rel |\n|---|---|---|")
    for ctx in (float(x) for x in args.contexts.split(",")):
        w = StreamingWindow(context_s=ctx)
        n = sum(samples_needed(12 * (k + 1), w) <= len(wave) for k in range(10**4))
        blocks = [SimpleNamespace(features="streaming")] * n
        print(f"| {ctx:g} s | {n} | {feature_diff(encoder, wave, blocks, w)['feat_window_max_rel']} |")


if __name__ == "__main__":
    main()
