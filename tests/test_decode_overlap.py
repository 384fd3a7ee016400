"""The VAE decode of block b overlapped with the DiT of block b+1 (render.ArtifactRenderer, issue 21).

The DiT of block b+1 runs on a worker thread while block b decodes on the caller's; block b's
frames come back as soon as they are decoded. The frames must be the serial ones byte for byte, a
resumed render must continue them, and the worker is always joined: by the next block, on an error
of the DiT or the decoder, on a Ctrl-C, and by `close()` (a cancelled render).
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from render_helpers import PROMPT, SIZE  # noqa: E402

from liveavatar_lite.pipeline.generate import prepare_inputs  # noqa: E402
from liveavatar_lite.pipeline.render import ArtifactBackend, ArtifactRenderer  # noqa: E402
from liveavatar_lite.pipeline.request import PipelineOptions, RenderRequest  # noqa: E402


def _ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dit-ahead"]


@pytest.fixture(scope="module")
def renders(tiny_artifact: Path, media: Path) -> dict[str, Any]:
    """2 clips through a serial and an overlapped renderer of one backend each (same process, same
    thread counts), and the overlapped renderer's state after clip 0."""
    request = RenderRequest(image=media / "photo.png", audio=media / "speech.wav", prompt=PROMPT, size=SIZE,
                            num_clip=2, seed=7, progress=False)
    inputs = prepare_inputs(request)
    import torch

    out: dict[str, Any] = {"inputs": inputs}
    for overlap in (False, True):
        backend = ArtifactBackend.open(PipelineOptions(tiny_artifact, cache_dir=media / "cache", progress=False,
                                                       overlap_decode=overlap))
        renderer = backend.build(inputs)
        frames = []
        for clip in range(2):
            frames += [renderer.block_frames(clip, b) for b in range(renderer.blocks_per_clip)]
            if clip == 0:  # saved as a checkpoint is (the live state's tensors keep changing)
                buf = io.BytesIO()
                torch.save(renderer.state(), buf)
                out[f"state_{overlap}"] = buf.getvalue()
                out[f"counters_{overlap}"] = renderer.counters()
        out[overlap] = frames
        out[f"backend_{overlap}"] = backend
    return out


@pytest.mark.slow  # two tiny renders of 2 clips: ~1 min on a loaded 2-core VM
def test_overlapped_frames_are_the_serial_frames(renders: dict[str, Any]) -> None:
    serial, overlapped = renders[False], renders[True]
    assert len(serial) == len(overlapped) == 8
    for a, b in zip(serial, overlapped):
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert not _ahead_threads()
    # telemetry: the decoder's time split into hidden (behind the DiT) and exposed; serial hides none
    c = renders["counters_True"]
    assert c["decode_s"] > 0 and c["decode_exposed_s"] <= c["decode_s"]
    assert c["decode_hidden_s"] == pytest.approx(c["decode_s"] - c["decode_exposed_s"])
    assert renders["counters_False"]["decode_hidden_s"] == 0.0


@pytest.mark.slow
def test_a_resumed_overlapped_render_continues_the_serial_frames(renders: dict[str, Any]) -> None:
    """The state at a clip's end is the serial one: loaded into a fresh overlapped renderer, clip 1
    comes out as the uninterrupted serial render's clip 1."""
    import torch

    serial, overlapped = (torch.load(io.BytesIO(renders[f"state_{o}"]), weights_only=True) for o in (False, True))
    for key in ("generator", "decoder"):
        assert serial[key].keys() == overlapped[key].keys()
    for k, v in serial["decoder"].items():
        assert torch.equal(v, overlapped["decoder"][k]), k  # the decoder's caches: the serial ones
    renderer = renders["backend_True"].build(renders["inputs"])
    renderer.load_state(overlapped)
    resumed = [renderer.block_frames(1, b) for b in range(renderer.blocks_per_clip)]
    for a, b in zip(renders[False][4:], resumed):
        assert np.array_equal(a, b)


@dataclass
class _Block:
    clip: int
    block: int
    latents: Any


class _Generator:
    """Blocks of one clip of 4; raises `fail` when asked for block `at`."""

    def __init__(self, fail: BaseException | None = None, at: int = -1) -> None:
        self.n, self.fail, self.at = 0, fail, at

    def next_block(self) -> _Block:
        import torch

        if self.n == self.at and self.fail is not None:
            raise self.fail
        b = _Block(self.n // 4, self.n % 4, torch.full((2, 1), float(self.n)))
        self.n += 1
        return b


class _Decoder:
    """Frames = the latents; waits on `gate` (if set) so that the DiT side runs while it decodes."""

    def __init__(self, gate: threading.Event | None = None, fail_on: float | None = None,
                 interrupt_on: float | None = None) -> None:
        self.gate, self.fail_on, self.interrupt_on, self.seen = gate, fail_on, interrupt_on, []

    def decode(self, latents: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(timeout=60)
        if self.fail_on is not None and latents.flat[0] == self.fail_on:
            raise RuntimeError("decoder failed")
        if self.interrupt_on is not None and latents.flat[0] == self.interrupt_on:
            raise KeyboardInterrupt
        self.seen.append(float(latents.flat[0]))
        return latents.copy()


class _GatedGenerator(_Generator):
    """Opens the decoder's gate only from the DiT of block 1 (on the worker): the two overlap."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def next_block(self) -> _Block:
        if self.n == 1:  # block 0 decodes (held at the gate) while block 1 is computed
            assert threading.current_thread().name == "dit-ahead"
            self.gate.set()
        return super().next_block()


class _HeldGenerator(_Generator):
    """The DiT of block 1 runs until `release` is set (and says when it started and ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release, self.ended = threading.Event(), threading.Event(), threading.Event()

    def next_block(self) -> _Block:
        if self.n == 1:
            self.started.set()
            assert self.release.wait(timeout=60)
            out = super().next_block()
            self.ended.set()
            return out
        return super().next_block()


def test_decode_runs_while_the_next_block_computes() -> None:
    gate = threading.Event()
    r = ArtifactRenderer(_GatedGenerator(gate), _Decoder(gate), None, 4, overlap_decode=True)
    frames = [r.block_frames(0, b) for b in range(4)]
    assert [float(f.flat[0]) for f in frames] == [0.0, 1.0, 2.0, 3.0]
    assert not _ahead_threads()


def test_a_blocks_frames_return_before_the_next_blocks_dit_finishes() -> None:
    """Block 0's frames come back while the DiT of block 1 still runs (time to first frame is one
    block's DiT + decode, not two DiTs); block 1's call then waits for it."""
    gen = _HeldGenerator()
    r = ArtifactRenderer(gen, _Decoder(), None, 4, overlap_decode=True)
    frames = r.block_frames(0, 0)
    assert float(frames.flat[0]) == 0.0
    assert gen.started.wait(timeout=60) and not gen.ended.is_set()  # returned while the DiT of block 1 runs
    with pytest.raises(RuntimeError, match="computed ahead"):
        r.state()  # no checkpoint mid-clip
    gen.release.set()
    assert float(r.block_frames(0, 1).flat[0]) == 1.0 and gen.ended.is_set()
    r.close()
    assert not _ahead_threads()


def test_close_joins_the_dit_running_ahead() -> None:
    """A cancelled render (serve stops between blocks) calls close(): the worker is joined."""
    gen = _HeldGenerator()
    r = ArtifactRenderer(gen, _Decoder(), None, 4, overlap_decode=True)
    r.block_frames(0, 0)
    assert _ahead_threads()
    threading.Timer(0.05, gen.release.set).start()  # released while close() waits
    r.close()
    assert gen.ended.is_set() and not _ahead_threads() and r._ahead is None
    r.close()  # idempotent


def test_a_cancelled_serve_render_closes_the_renderer() -> None:
    from types import SimpleNamespace

    from liveavatar_lite.serve.runner import _ObservedRenderer

    closed = []
    inner = type("R", (), {"blocks_per_clip": 4, "close": lambda self: closed.append(True)})()
    _ObservedRenderer(inner, SimpleNamespace(blocks_per_clip=0)).close()
    assert closed == [True]


@pytest.mark.parametrize("fail", [RuntimeError("DiT out of memory"), KeyboardInterrupt()])
def test_a_failing_dit_leaves_no_thread_behind(fail: BaseException) -> None:
    """The DiT of block 2 fails (or Ctrl-C lands in it) on the worker while block 1 decodes: the
    worker ends, and the failure reaches the caller when block 2 is asked for."""
    dec = _Decoder()
    r = ArtifactRenderer(_Generator(fail, at=2), dec, None, 4, overlap_decode=True)
    r.block_frames(0, 0)
    r.block_frames(0, 1)  # decodes block 1 while computing block 2, which fails
    with pytest.raises(type(fail)):
        r.block_frames(0, 2)
    assert dec.seen == [0.0, 1.0] and not _ahead_threads() and r._ahead is None


@pytest.mark.parametrize("interrupt", [False, True])
def test_a_failing_decoder_joins_the_dit_and_reaches_the_caller(interrupt: bool) -> None:
    dec = _Decoder(interrupt_on=1.0) if interrupt else _Decoder(fail_on=1.0)
    r = ArtifactRenderer(_Generator(), dec, None, 4, overlap_decode=True)
    r.block_frames(0, 0)
    with pytest.raises(KeyboardInterrupt if interrupt else RuntimeError):
        r.block_frames(0, 1)
    assert not _ahead_threads() and r._ahead is None


def test_the_last_block_of_a_clip_is_not_computed_ahead() -> None:
    """At a clip's end nothing is computed ahead, so a checkpoint's state is the serial one."""
    gen = _Generator()
    r = ArtifactRenderer(gen, _Decoder(), None, 4, overlap_decode=True)
    for b in range(4):
        r.block_frames(0, b)
    assert gen.n == 4 and r._ahead is None and not _ahead_threads()


def test_block_output_gives_the_latents_with_the_frames() -> None:
    r = ArtifactRenderer(_Generator(), _Decoder(), None, 4, overlap_decode=False)
    latents, frames = r.block_output(0, 0)
    assert latents.dtype == np.float32 and np.array_equal(latents, frames)


def test_the_ledger_predicts_the_clip_with_its_decoder() -> None:
    """The measured clip seconds include decoding: the ledger's prediction is the plan's clip_seconds
    (the DiT + the decoder time it does not hide), not the DiT alone."""
    from types import SimpleNamespace

    from liveavatar_lite.pipeline.ledger import memory_ledger
    from liveavatar_lite.runtime.plan import Plan

    plan = Plan(weight_format="int8", size=(64, 64), units=(), kv=(), peak_vram_bytes=0, host_ram_bytes=0,
                h2d_bytes_per_clip=0, predicted_seconds_per_clip=10.0, vram_budget_bytes=0,
                decode_seconds_per_clip=3.0, decode_exposed_seconds_per_clip=1.5)
    runtime = SimpleNamespace(device=SimpleNamespace(type="cpu"), device_bytes=dict, host_bytes=dict)
    rows = memory_ledger(plan, runtime, None, 11.0, {})
    assert rows["seconds"] == {"predicted": 11.5, "measured": 11.0}
