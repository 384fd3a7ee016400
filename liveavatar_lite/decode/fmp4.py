"""Live output for browsers: fragmented mp4 (h264 + aac) that Media Source Extensions append as it comes.

A talk session (serve's WebSocket) sends an init segment once, then one media segment per rendered
block, each a `moof` + `mdat` whose video starts with a keyframe, so a block is playable the moment
it arrives (no block is held back waiting for the next one, as FFmpeg's mp4 muxer does: it closes a
fragment only when the next one starts). The boxes are written here (ISO/IEC 14496-12); the
encoders are PyAV's: libx264 with zero latency (no B-frames, no lookahead: one packet per frame,
at once) and FFmpeg's aac at the speech's own 16 kHz.

Audio and video share one timeline (block k's frames at their frame times, its speech from the
same instant). The aac encoder's first packet is its priming (1024 samples of delay) and is
dropped, so speech and lips line up; aac packets come out up to ~2 frames (128 ms) behind the
samples fed, so a block's fragment carries the aac packets ready by then and the rest follow in
the next blocks (`flush()` ends the stream with the tail).

    mux = FragmentMuxer(width=704, height=384, fps=25)
    ws.send(mux.init_segment())                       # ftyp + moov; mux.mime for MediaSource
    for block in session:
        ws.send(mux.block(block.frames, block.audio)) # moof + mdat (uint8 [n, H, W, 3], float32 16 kHz)
    ws.send(mux.flush())                              # the aac tail (may be b"")

The output is a deterministic function of the frames and samples fed (fixed encoder settings and
threads): the same blocks through a fresh muxer give the same bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

AUDIO_RATE = 16000  # the speech's rate (StreamBlock.audio): aac encodes it as is
AAC_FRAME = 1024  # samples per aac packet
VIDEO_TIMESCALE = 90000  # ticks per second of the video track
_VIDEO_TRACK, _AUDIO_TRACK = 1, 2
_KEY_FLAGS = 0x02000000  # sample_depends_on = 2: a sync sample
_DELTA_FLAGS = 0x01010000  # depends on others, not a sync sample
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


@dataclass(frozen=True)
class FragmentSpec:
    """Encoder settings of a session's stream (fixed, so its bytes do not depend on the machine)."""

    width: int
    height: int
    fps: int = 25
    crf: int = 23
    preset: str = "veryfast"
    audio_bitrate: int = 48000
    threads: int = 1  # fixed: x264's output depends on its thread count


class FragmentMuxer:
    """h264 + aac into fragmented mp4: `init_segment()` once, then `block()` per block, `flush()` at the end."""

    def __init__(self, spec: FragmentSpec) -> None:
        import av

        if spec.width % 2 or spec.height % 2:
            raise ValueError(f"h264 4:2:0 needs even sides, got {spec.width}x{spec.height}")
        self.spec = spec
        video = av.CodecContext.create("libx264", "w")
        video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
        video.time_base, video.framerate = Fraction(1, spec.fps), Fraction(spec.fps, 1)
        video.flags |= av.codec.context.Flags.global_header  # SPS/PPS in the init segment, not in-band
        video.options = {"preset": spec.preset, "tune": "zerolatency", "crf": str(spec.crf), "bf": "0",
                         "profile": "baseline", "threads": str(spec.threads), "forced-idr": "1",
                         "g": "1000"}  # keyframes where a block starts (forced), not on a schedule
        video.open()
        audio = av.CodecContext.create("aac", "w")
        audio.sample_rate, audio.layout, audio.format = AUDIO_RATE, "mono", "fltp"
        audio.bit_rate = spec.audio_bitrate
        audio.time_base = Fraction(1, AUDIO_RATE)
        audio.flags |= av.codec.context.Flags.global_header
        audio.open()
        self._video, self._audio = video, audio
        self._sps, self._pps = _parameter_sets(bytes(video.extradata or b""))
        self._asc = bytes(audio.extradata or b"")
        if not self._asc:
            raise RuntimeError("the aac encoder gave no AudioSpecificConfig")
        self._frames = 0  # video frames encoded so far (the next frame's pts)
        self._samples = 0  # audio samples handed to the aac encoder (the next frame's pts)
        self._pending = np.zeros(0, np.float32)  # samples short of a whole aac frame
        self._sequence = 0
        self._audio_decoded = 0  # aac samples placed on the timeline so far
        self.bytes_out = 0

    @property
    def mime(self) -> str:
        """The MediaSource type of this stream, e.g. 'video/mp4; codecs="avc1.42C01E, mp4a.40.2"'."""
        profile, compat, level = self._sps[1:4]
        return f'video/mp4; codecs="avc1.{profile:02X}{compat:02X}{level:02X}, mp4a.40.2"'

    # ---- segments ---------------------------------------------------------------------------------

    def init_segment(self) -> bytes:
        """ftyp + moov: the tracks and their decoder configs, no samples (each fragment carries its own)."""
        ftyp = _box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6avc1mp41")
        mvhd = _full(b"mvhd", 0, 0, struct.pack(">IIIIIH", 0, 0, 1000, 0, 0x10000, 0x100), bytes(10), _MATRIX,
                     bytes(24), struct.pack(">I", _AUDIO_TRACK + 1))
        moov = _box(b"moov", mvhd, self._video_trak(), self._audio_trak(),
                    _box(b"mvex", _trex(_VIDEO_TRACK), _trex(_AUDIO_TRACK)))
        out = ftyp + moov
        self.bytes_out += len(out)
        return out

    def block(self, frames: np.ndarray, audio: np.ndarray) -> bytes:
        """One media segment: `frames` uint8 [n, H, W, 3] (RGB; the first becomes a keyframe) and the
        block's speech (float32 [m] at 16 kHz); the aac packets ready so far ride along."""
        if frames.ndim != 4 or frames.shape[1:] != (self.spec.height, self.spec.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [n, {self.spec.height}, {self.spec.width}, 3], "
                             f"got {frames.dtype} {list(frames.shape)}")
        video = [self._encode_frame(frame, key=i == 0) for i, frame in enumerate(frames)]
        return self._fragment(video, self._encode_audio(np.asarray(audio, np.float32).reshape(-1)))

    def flush(self) -> bytes:
        """The end of the stream: the last samples (padded to an aac frame) and the encoder's tail."""
        packets = self._encode_audio(np.zeros(0, np.float32), final=True)
        return self._fragment([], packets) if packets else b""

    # ---- encoding ---------------------------------------------------------------------------------

    def _encode_frame(self, rgb: np.ndarray, key: bool) -> tuple[bytes, bool]:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
        frame.pts = self._frames
        if key:
            frame.pict_type = av.video.frame.PictureType.I
        packets = self._video.encode(frame)
        self._frames += 1
        # zerolatency: no lookahead, no B-frames, so each frame comes back as its packet at once
        if len(packets) != 1:
            raise RuntimeError(f"the h264 encoder returned {len(packets)} packets for one frame")
        packet = packets[0]
        if key and not packet.is_keyframe:
            raise RuntimeError("the h264 encoder did not make a block's first frame a keyframe")
        return _length_prefixed(bytes(packet)), packet.is_keyframe

    def _encode_audio(self, samples: np.ndarray, final: bool = False) -> list[bytes]:
        import av

        pending = np.concatenate([self._pending, samples])
        if final and len(pending) % AAC_FRAME:
            pending = np.concatenate([pending, np.zeros(AAC_FRAME - len(pending) % AAC_FRAME, np.float32)])
        whole = len(pending) // AAC_FRAME * AAC_FRAME
        self._pending = pending[whole:].copy()
        packets: list = []
        for start in range(0, whole, AAC_FRAME):
            frame = av.AudioFrame.from_ndarray(pending[None, start:start + AAC_FRAME], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = AUDIO_RATE, self._samples
            self._samples += AAC_FRAME
            packets += self._audio.encode(frame)
        if final:
            packets += self._audio.encode(None)
        # the first packet (pts -1024) is the encoder's priming: dropped, so speech starts at time 0
        return [bytes(p) for p in packets if p.pts is None or p.pts >= 0]

    # ---- boxes ------------------------------------------------------------------------------------

    def _fragment(self, video: list[tuple[bytes, bool]], audio: list[bytes]) -> bytes:
        """moof + mdat with the video samples, then the audio samples, each track at its running time."""
        self._sequence += 1
        video_start = (self._frames - len(video)) * (VIDEO_TIMESCALE // self.spec.fps)
        audio_start = self._audio_decoded
        self._audio_decoded += len(audio) * AAC_FRAME
        tracks = []
        if video:
            tracks.append((_VIDEO_TRACK, video_start, VIDEO_TIMESCALE // self.spec.fps,
                           [(data, _KEY_FLAGS if key else _DELTA_FLAGS) for data, key in video]))
        if audio:
            tracks.append((_AUDIO_TRACK, audio_start, AAC_FRAME, [(data, _KEY_FLAGS) for data in audio]))

        def moof(offsets: list[int]) -> bytes:
            trafs = [_traf(track, start, duration, samples, offset)
                     for (track, start, duration, samples), offset in zip(tracks, offsets)]
            return _box(b"moof", _full(b"mfhd", 0, 0, struct.pack(">I", self._sequence)), *trafs)

        size = len(moof([0] * len(tracks)))  # the offsets' values do not change the box's size
        offsets, at = [], size + 8  # sample data starts after moof and mdat's header
        for _, _, _, samples in tracks:
            offsets.append(at)
            at += sum(len(data) for data, _ in samples)
        payload = b"".join(data for _, _, _, samples in tracks for data, _ in samples)
        out = moof(offsets) + _box(b"mdat", payload)
        self.bytes_out += len(out)
        return out

    def _video_trak(self) -> bytes:
        s = self.spec
        avcc = _box(b"avcC", bytes([1, self._sps[1], self._sps[2], self._sps[3], 0xFF, 0xE1]),
                    struct.pack(">H", len(self._sps)), self._sps, bytes([1]), struct.pack(">H", len(self._pps)),
                    self._pps)
        entry = _box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", s.width, s.height),
                     struct.pack(">II", 0x480000, 0x480000), bytes(4), struct.pack(">H", 1), bytes(32),
                     struct.pack(">Hh", 0x18, -1), avcc)
        media = _box(b"minf", _full(b"vmhd", 0, 1, bytes(8)), _dinf(), _stbl(entry))
        return _trak(_VIDEO_TRACK, VIDEO_TIMESCALE, b"vide", media, volume=0, width=s.width, height=s.height)

    def _audio_trak(self) -> bytes:
        decoder_specific = _descriptor(5, self._asc)
        config = _descriptor(4, bytes([0x40, 0x15]) + struct.pack(">I", 0)[1:] +
                             struct.pack(">II", self.spec.audio_bitrate, self.spec.audio_bitrate) + decoder_specific)
        es = _descriptor(3, struct.pack(">HB", 0, 0) + config + _descriptor(6, b"\x02"))
        entry = _box(b"mp4a", bytes(6), struct.pack(">H", 1), bytes(8), struct.pack(">HHHH", 1, 16, 0, 0),
                     struct.pack(">I", AUDIO_RATE << 16), _full(b"esds", 0, 0, es))
        media = _box(b"minf", _full(b"smhd", 0, 0, bytes(4)), _dinf(), _stbl(entry))
        return _trak(_AUDIO_TRACK, AUDIO_RATE, b"soun", media, volume=0x100, width=0, height=0)


def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *parts)


def _descriptor(tag: int, body: bytes) -> bytes:
    if len(body) > 127:
        raise ValueError("descriptor too long for a one-byte size")
    return bytes([tag, len(body)]) + body


def _trak(track: int, timescale: int, handler: bytes, minf: bytes, volume: int, width: int, height: int) -> bytes:
    tkhd = _full(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track, 0, 0), bytes(8),
                 struct.pack(">hhHH", 0, 0, volume, 0), _MATRIX, struct.pack(">II", width << 16, height << 16))
    mdhd = _full(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))  # language "und"
    name = b"liveavatar-lite\0"
    hdlr = _full(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name)
    return _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))


def _dinf() -> bytes:
    return _box(b"dinf", _full(b"dref", 0, 0, struct.pack(">I", 1), _full(b"url ", 0, 1)))


def _stbl(entry: bytes) -> bytes:
    empty = struct.pack(">I", 0)
    return _box(b"stbl", _full(b"stsd", 0, 0, struct.pack(">I", 1), entry), _full(b"stts", 0, 0, empty),
                _full(b"stsc", 0, 0, empty), _full(b"stsz", 0, 0, empty, empty), _full(b"stco", 0, 0, empty))


def _trex(track: int) -> bytes:
    return _full(b"trex", 0, 0, struct.pack(">IIIII", track, 1, 0, 0, 0))


def _traf(track: int, start: int, duration: int, samples: list[tuple[bytes, int]], data_offset: int) -> bytes:
    tfhd = _full(b"tfhd", 0, 0x020000, struct.pack(">I", track))  # default-base-is-moof
    tfdt = _full(b"tfdt", 1, 0, struct.pack(">Q", start))
    rows = b"".join(struct.pack(">III", duration, len(data), flags) for data, flags in samples)
    # flags: data-offset, and per sample its duration, size and flags
    trun = _full(b"trun", 0, 0x000701, struct.pack(">Ii", len(samples), data_offset), rows)
    return _box(b"traf", tfhd, tfdt, trun)


def _nal_units(annexb: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (split at 00 00 01 start codes)."""
    units, i, n = [], 0, len(annexb)
    starts = []
    while i + 3 <= n:
        if annexb[i] == 0 and annexb[i + 1] == 0 and annexb[i + 2] == 1:
            starts.append(i + 3)
            i += 3
        else:
            i += 1
    for k, start in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else n
        unit = annexb[start:end]
        while k + 1 < len(starts) and unit.endswith(b"\0"):  # the zero byte of a 4-byte start code
            unit = unit[:-1]
        units.append(unit)
    return units


def _length_prefixed(annexb: bytes) -> bytes:
    """An Annex B access unit as mp4 samples carry it: each NAL unit after its 4-byte length."""
    return b"".join(struct.pack(">I", len(u)) + u for u in _nal_units(annexb))


def _parameter_sets(extradata: bytes) -> tuple[bytes, bytes]:
    """(SPS, PPS) from x264's global header (Annex B)."""
    units = _nal_units(extradata)
    sps = [u for u in units if u and u[0] & 0x1F == 7]
    pps = [u for u in units if u and u[0] & 0x1F == 8]
    if not sps or not pps:
        raise RuntimeError("the h264 encoder gave no SPS/PPS in its global header")
    return sps[0], pps[0]
