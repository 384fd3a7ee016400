"""`Pipeline`: load an artifact once, render many videos from it, watch them while they render.

    from liveavatar_lite import Pipeline

    pipe = Pipeline.from_artifact("la-int8/", vram_gb=24, kv="fp8")   # DiT, decoder, wav2vec2: once
    result = pipe.render(image="me.jpg", audio="hi.wav", prompt="a person talking", out="me.mp4",
                         live="live/")                               # live/index.m3u8 grows per clip
    for block in pipe.stream(image="me.jpg", audio="hi.wav", prompt="a person talking"):
        show(block.frames)                                            # uint8 [n, H, W, 3], as decoded
    with pipe.session(image="me.jpg", prompt="a person talking") as sess:  # speech in as it comes
        sess.feed(pcm, 48000); sess.end()                             # (any thread; docs/talk.md)
        for block in sess: show(block.frames)                         # SessionBlock, as each renders

A second render reuses everything loaded (`pipe.loads` counts the loads); prompts and photos are
encoded once and cached on disk by content. The `generate` command is `generate()` below: validate
the inputs, load a Pipeline planned for their size, render once.
"""
from __future__ import annotations

import logging
import numbers
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import numpy as np

from ..errors import UserError
from .generate import iter_blocks, prepare_inputs, render_to_file
from .render import ArtifactBackend
from .session import Session
from .request import (
    Backend,
    PipelineOptions,
    RenderInputs,
    RenderRequest,
    RenderResult,
    StreamBlock,
)

log = logging.getLogger(__name__)

PathLike = str | Path


class Pipeline:
    """A loaded artifact (or any `Backend`) plus the clip loop; render() and stream() reuse what is loaded.

    One render at a time: the loaded models hold one render's state (KV caches, decoder cache), so
    a render or a stream's next block started while another thread renders is refused with one line
    (UserError) instead of mixing the two; and a `stream()` left unfinished is stale once another
    render or stream starts: its next block raises instead of yielding wrong frames.
    """

    def __init__(self, backend: Backend, progress: bool = True, size: str = "704*384") -> None:
        self.backend, self.progress = backend, progress
        self.size = size  # the default size of render() and stream(): what the Pipeline was planned for
        self._busy = threading.Lock()  # held while a render runs, or while a stream computes one block
        self._generation = 0  # which render or stream last used the models (a stream checks it is still its own)

    def _claim(self) -> int:
        """Take the models for a new render or stream (UserError while another thread renders)."""
        if not self._busy.acquire(blocking=False):
            raise UserError("this Pipeline is rendering in another thread; render one video at a time per "
                            "Pipeline (wait for it, or load a second Pipeline)")
        self._generation += 1
        return self._generation

    @classmethod
    def from_artifact(cls, artifact: PathLike, *, vram_gb: float | None = None, ram_gb: float | None = None,
                      kv: str = "bf16", cache_dir: PathLike | None = None, size: str = "704*384",
                      progress: bool = True, device_profile: str | None = None,
                      compile_units: str = "auto", attention: str = "auto") -> Pipeline:
        """Open `artifact` and load it, planned for photos framed at `size` (a W*H area; see `render`).
        `device_profile` names the GPU figures the plan uses (as `plan --device-profile`; on a machine
        without a GPU, with `vram_gb`, it plans and runs the layout of a GPU of that size);
        `compile_units` runs each DiT unit as one fused torch.compile graph: "auto" (on for CUDA), "on", "off";
        `attention` picks the attention kernel (auto, sdpa, flash, cudnn, efficient, math, sage; runtime/attention.py).

        Pipeline.from_artifact("la-int8/", vram_gb=24, kv="fp8")  # UserError for a bad artifact or budget
        """
        options = PipelineOptions(Path(artifact), vram_gb=vram_gb, ram_gb=ram_gb, kv_dtype=kv,
                                  device_profile=device_profile, compile_units=compile_units, attention=attention,
                                  cache_dir=None if cache_dir is None else Path(cache_dir), progress=progress)
        pipe = cls.from_options(options, _size_dims(size))
        pipe.size = size  # render() and stream() default to the size the models were planned for
        return pipe

    @classmethod
    def from_options(cls, options: PipelineOptions, size: tuple[int, int] | None = None) -> Pipeline:
        """A Pipeline over `options.artifact`; with `size` (width, height) its models load now, else
        at the first render."""
        backend = ArtifactBackend.open(options)
        if size is not None:
            backend.load(size)
        return cls(backend, options.progress)

    @property
    def loads(self) -> dict[str, int]:
        """How many times each model was loaded (dit, decoder, audio_encoder, vae_encoder, t5)."""
        return dict(getattr(self.backend, "loads", {}))

    def render(self, image: PathLike, audio: PathLike, prompt: str, out: PathLike, *, size: str | None = None,
               seed: int = 42, num_clip: int | None = None, resume: bool = False, live: PathLike | None = None,
               telemetry: PathLike | None = None, checkpoint_interval_s: float = 600.0) -> RenderResult:
        """Render to `out` (.mp4, written atomically; resumable with `resume=True` after a crash).

        `size` is a pixel area (an upstream key such as "704*384" or a custom "W*H"; default: the
        Pipeline's own, as given to `from_artifact`); the photo keeps its aspect with sides snapped to 64. `live`: a directory that gets `index.m3u8` + one segment
        per finished clip while rendering. Returns the mp4's clips, frames, size and timings.
        """
        return self.run(RenderRequest(
            image=_path(image), audio=_path(audio), prompt=prompt, out=_path(out), size=size or self.size,
            num_clip=_integer(num_clip),
            seed=_integer(seed), resume=resume, telemetry=None if telemetry is None else _path(telemetry),
            live=None if live is None else _path(live), checkpoint_interval_s=checkpoint_interval_s,
            progress=self.progress))

    def run(self, request: RenderRequest, inputs: RenderInputs | None = None) -> RenderResult:
        """`render` for a typed request (what the CLI and the service build); `inputs` if already validated."""
        self._claim()
        try:
            return render_to_file(self.backend, request, inputs)
        finally:
            self._busy.release()

    def stream(self, image: PathLike, audio: PathLike, prompt: str, *, size: str | None = None, seed: int = 42,
               num_clip: int | None = None) -> Iterator[StreamBlock]:
        """Yield the video block by block as it is decoded (no file): `StreamBlock.frames` uint8
        [n, H, W, 3] and the span of speech it plays over. Same frames as `render` with the same inputs.
        """
        request = RenderRequest(image=_path(image), audio=_path(audio), prompt=prompt, size=size or self.size,
                                seed=_integer(seed), num_clip=_integer(num_clip), progress=self.progress)
        inputs = prepare_inputs(request)  # bad input fails here, at the call, not at the first next()
        return self._stream(inputs)

    def _stream(self, inputs: RenderInputs) -> Iterator[StreamBlock]:
        """The blocks of `inputs`, each computed under the lock, while no other render has intervened."""
        mine = self._claim()
        blocks = None
        try:
            blocks = iter_blocks(self.backend, inputs)
            while True:
                try:
                    block = next(blocks)
                except StopIteration:
                    return
                finally:
                    self._busy.release()
                yield block  # (the models are free while the caller looks at the block)
                if not self._busy.acquire(blocking=False):
                    raise UserError("this Pipeline is rendering in another thread; finish this stream "
                                    "before starting another render")
                if self._generation != mine:
                    self._busy.release()
                    raise UserError("this stream is stale: another render or stream used the Pipeline "
                                    "since its last block; start a new stream()")
        finally:
            if blocks is not None:
                blocks.close()

    def session(self, image: PathLike, prompt: str, *, size: str | None = None, seed: int = 42,
                idle: str = "listen", lookahead_s: float = 0.4, context_s: float = 4.0,
                telemetry: PathLike | None = None) -> Session:
        """A talk session (pipeline/session.py, docs/talk.md): speech fed as it arrives, the video
        yielded block by block as soon as each block's speech (plus `lookahead_s`) is there.

        `idle`: "listen" renders silence blocks paced at real time between utterances, "pause"
        renders nothing until speech comes. `lookahead_s` (0.1 .. 10) is how much speech past a
        block it waits for, `context_s` (0 .. 60) how much before it wav2vec2 sees; `telemetry` a
        JSON-lines file with one line per block (its latency). The session holds this Pipeline
        until `close()` (a render meanwhile is refused with one line); the models stay loaded.

            with pipe.session("me.jpg", "a person talking") as sess:
                sess.feed(samples, 16000); sess.end()
                for block in sess: ...   # SessionBlock: frames, audio, utterance, latency_s
        """
        from ..conditioning.photo import load_reference
        from ..conditioning.streaming_features import StreamingWindow
        from ..conditioning.text_tokenizer import check_prompt
        from ..fileio import require_file
        from .generate import check_numbers
        from .session import IDLE_MODES
        from .telemetry import Telemetry
        from .workdir import check_output_path

        if idle not in IDLE_MODES:
            raise UserError(f"idle must be one of {', '.join(IDLE_MODES)}, got {idle!r}")
        window = _streaming_window(lookahead_s, context_s)
        request = RenderRequest(image=_path(image), audio=Path("<session>"), prompt=prompt, size=size or self.size,
                                seed=_integer(seed), progress=self.progress)  # a session has no speech file
        check_numbers(request)
        check_prompt(prompt)
        require_file(request.image, "image")
        if telemetry is not None:
            check_output_path(Path(telemetry), "telemetry", suffix=None)
        reference = load_reference(request.image, request.size)  # float32 [3, H, W]; UserError if unusable
        builder = getattr(self.backend, "build_session", None)
        if builder is None:
            raise UserError("this Pipeline's backend cannot run talk sessions")
        inputs = RenderInputs(request, reference, int(reference.shape[1]), int(reference.shape[2]), 1,
                              np.zeros(0, np.float32))
        self._claim()  # held until the session closes
        encoder = None
        try:
            renderer = builder(inputs)
            encoder = self.backend.session_audio_encoder()
            silence = self.backend.silence_features(request.sample.video_frames_per_block)
            tel = Telemetry.open(Path(telemetry), append=False) if telemetry is not None else None
        except BaseException:
            if encoder is not None:
                self.backend.release_session_audio_encoder()
            self._busy.release()
            raise
        backend = self.backend

        def release() -> None:
            try:
                backend.release_session_audio_encoder()
            finally:
                self._busy.release()

        if tel is not None:
            tel.event("session", width=inputs.width, height=inputs.height, seed=seed, idle=idle,
                      lookahead_s=window.lookahead_s, context_s=window.context_s)
        return Session(renderer, encoder, feature_dtype=backend.feature_dtype, silence=silence,
                       sample=request.sample, idle=idle, window=window, telemetry=tel, release=release,
                       width=inputs.width, height=inputs.height)

    def close(self) -> None:
        """Drop the loaded models (their memory returns when nothing else refers to them)."""
        self.backend = _Closed()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Closed:
    """The backend of a closed Pipeline: every use is a clear error."""

    loads: dict[str, int] = {}

    def identity(self) -> str:
        raise UserError("this Pipeline is closed; create a new one")

    def build(self, inputs: RenderInputs) -> None:
        raise UserError("this Pipeline is closed; create a new one")


def _streaming_window(lookahead_s: Any, context_s: Any) -> Any:
    """The session's StreamingWindow from its keywords; UserError (one line) when out of range."""
    from ..conditioning.streaming_features import MIN_LOOKAHEAD_S, StreamingWindow

    for name, v, lo, hi in (("lookahead_s", lookahead_s, MIN_LOOKAHEAD_S, 10.0), ("context_s", context_s, 0.0, 60.0)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise UserError(f"{name} must be a number of seconds from {lo:g} to {hi:g}, got {v!r}")
    return StreamingWindow(lookahead_s=float(lookahead_s), context_s=float(context_s))


def _path(value: object) -> object:
    """A str or os.PathLike as a Path; anything else as it is, for check_numbers to refuse in one line."""
    return Path(value) if isinstance(value, (str, os.PathLike)) else value


def _integer(value: object) -> object:
    """A numpy (or other Integral) integer as an int, so seed=np.int64(7) is seed 7; bools and the
    rest as they are (check_numbers refuses them)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def _size_dims(size: str) -> tuple[int, int]:
    """'704*384' -> (704, 384): the planning size of a Pipeline (UserError if malformed)."""
    from ..conditioning.photo import parse_size

    parse_size(size)  # the same rules as a render's --size
    w, h = (int(x) for x in size.lower().replace("x", "*").split("*"))
    return w, h


def generate(request: RenderRequest, options: PipelineOptions | None = None,
             backend: Backend | None = None) -> RenderResult:
    """One render from a cold start, as the `generate` command does it.

    The inputs are validated first (a bad photo fails in a second, before anything loads); then a
    Pipeline is loaded for the photo's framed size (or `backend` is used) and renders once.

        generate(RenderRequest(image=Path("me.jpg"), audio=Path("hi.wav"), prompt="...", out=Path("o.mp4")),
                 PipelineOptions(Path("la-int8")))
    """
    inputs = prepare_inputs(request)
    if backend is None:
        if options is None:
            raise ValueError("generate needs PipelineOptions or a backend")
        pipe = Pipeline.from_options(options, (inputs.width, inputs.height))
    else:
        pipe = Pipeline(backend, request.progress)
    return pipe.run(request, inputs)
