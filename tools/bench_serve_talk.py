"""Per-block latency of a talk session served by `liveavatar-lite serve` (tiny model): WebSocket in, fragments out.

    python tools/bench_serve_talk.py                              # builds a tiny checkpoint + artifact in a temp dir
    python tools/bench_serve_talk.py --artifact /tmp/la-tiny/art --chunk 0.1 --utterances 3

One server (its worker with OMP_NUM_THREADS=1) and one session at 64*64: the test speech (4.7 s)
is sent --utterances times over the WebSocket in --chunk second messages paced at real time, each
followed by {"type": "end"} and as much silence as the speech (a microphone never stops). Printed
for the utterance blocks: the session's own latency (render_latency_s: last speech sample in ->
frames, pipeline/session.py), the served latency (latency_s: + the mp4 encode + the hop through
the HTTP process to the WebSocket), their difference (what serving adds), and the fragment sizes;
mean, p50, p95 and max. Also the histogram's count in /metrics.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# beside this script (its sys.path[0]); importing it also puts tests/ and the repo on sys.path
from bench_pipeline import PROMPT, SIZE, _prepare

TOKEN = "0123456789abcdef0123456789abcdef"


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"mean {statistics.fmean(values):.3f}  p50 {statistics.median(values):.3f}  p95 {p95:.3f}  "
            f"max {max(values):.3f}  (n={len(values)})")


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import soundfile as sf
    import websocket
    from serve_helpers import ServeProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=None, help="a tiny artifact (default: build one)")
    ap.add_argument("--chunk", type=float, default=0.1, help="seconds of speech per WebSocket message")
    ap.add_argument("--utterances", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serve-talk-") as tmp:
        work = Path(tmp)
        artifact, media = _prepare(work, args.artifact)
        wave, rate = sf.read(str(media / "speech.wav"), dtype="float32")
        speech = wave.mean(axis=1).astype("<f4")
        step = max(1, int(rate * args.chunk))
        with ServeProcess(artifact, work / "state", token=TOKEN, cache_dir=work / "cache") as server:
            r = server.client.post("/v1/sessions", files={"image": ("photo.png", (media / "photo.png").read_bytes())},
                                   data={"prompt": PROMPT, "size": SIZE, "seed": "3"})
            assert r.status_code == 201, r.text
            session = r.json()
            ws = websocket.create_connection(
                f"ws://127.0.0.1:{server.port}{session['stream']}?token={TOKEN}&rate={rate}&format=f32", timeout=600)
            while json.loads(ws.recv())["type"] != "ready":
                pass
            done = threading.Event()

            def microphone() -> None:
                start = time.monotonic()
                sent = 0
                pieces = []
                for _ in range(args.utterances):
                    pieces += [speech[i:i + step] for i in range(0, len(speech), step)] + ["end"]
                    pieces += [np.zeros(step, "<f4")] * (len(speech) // step)
                for piece in pieces:
                    if isinstance(piece, str):
                        ws.send(json.dumps({"type": piece}))
                        continue
                    ws.send_binary(piece.tobytes())
                    sent += len(piece)
                    time.sleep(max(0.0, start + sent / rate - time.monotonic()))  # real time
                done.set()

            threading.Thread(target=microphone, daemon=True).start()
            blocks = []
            while not (done.is_set() and any(b["utterance"] == args.utterances for b in blocks)):
                message = ws.recv()
                if isinstance(message, str) and json.loads(message)["type"] == "block":
                    blocks.append(json.loads(message))
            ws.send(json.dumps({"type": "close"}))
            while True:
                try:
                    ws.recv()
                except websocket.WebSocketException:
                    break
            metrics = server.client.get("/metrics").text
        speech_blocks = [b for b in blocks if b["utterance"] is not None and b["utterance"] < args.utterances]
        served = [b["latency_s"] for b in speech_blocks]
        own = [b["render_latency_s"] for b in speech_blocks]
        count = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("liveavatar_session_block_latency_seconds_count"))
        print(f"session at {SIZE}, {args.utterances} utterance(s) of {len(speech) / rate:.1f} s in {args.chunk:g} s "
              f"messages at real time; {len(blocks)} blocks ({len(speech_blocks)} of speech)")
        print(f"  session latency (render_latency_s) : {_stats(own)}")
        print(f"  served latency (latency_s)         : {_stats(served)}")
        print(f"  serving adds (encode + hop)        : {_stats([s - o for s, o in zip(served, own)])}")
        print(f"  fragment bytes per block           : {_stats([float(b['bytes']) for b in blocks])}")
        print(f"  /metrics block latency count       : {count:.0f} (every block with a latency: "
              f"{sum(1 for b in blocks if b['latency_s'] is not None)} seen before the close, more after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
