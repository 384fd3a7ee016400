"""Browser playback of a job while it renders: one finished clip's live segment as a small mp4.

The live output (decode/hls.py) is HLS with MPEG-TS segments, which Safari, ffplay, VLC or hls.js
play, but Chromium's <video> does not. The page (static/app.js) therefore plays clip after clip
as mp4: each is the clip's TS segment stream-copied (no re-encode) into mp4 in memory, its
timestamps shifted to start at zero.

    data = segment_mp4(Path("jobs/<id>/live/seg_00000.ts"))  # bytes of an mp4 with h264 + aac
"""
from __future__ import annotations

import io
from pathlib import Path


def segment_mp4(segment: Path) -> bytes:
    """The TS segment's packets (video and audio) in an mp4 starting at time zero."""
    import av

    buf = io.BytesIO()
    with av.open(str(segment)) as src, av.open(buf, mode="w", format="mp4") as out:
        kept = [s for s in src.streams if s.type in ("video", "audio")]
        streams = {s.index: out.add_stream_from_template(s) for s in kept}
        offsets: dict[int, int] = {}
        for packet in src.demux(*kept):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            start = offsets.setdefault(packet.stream.index, packet.dts)  # the first dts: time zero
            packet.dts -= start
            if packet.pts is not None:
                packet.pts -= start
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return buf.getvalue()
