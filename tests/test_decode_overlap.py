"""The VAE decode of block b overlapped with the DiT of block b+1 (render.ArtifactRenderer, issue 21).

The frames must be the serial ones byte for byte (the decoder sees the same latents in the same
order), a resumed render must continue them, and no decode thread may outlive a `block_frames`
call, whatever fails: the DiT, the decoder, or a Ctrl-C.
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


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vae-decode"]


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
    assert not _decode_threads()
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

    def __init__(self, gate: threading.Event | None = None, fail_on: float | None = None) -> None:
        self.gate, self.fail_on, self.seen = gate, fail_on, []

    def decode(self, latents: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(timeout=60)
        if self.fail_on is not None and latents.flat[0] == self.fail_on:
            raise RuntimeError("decoder failed")
        self.seen.append(float(latents.flat[0]))
        return latents.copy()


class _GatedGenerator(_Generator):
    """Opens the decoder's gate only once the DiT of the next block has started: the two overlap."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def next_block(self) -> _Block:
        if self.n == 1:  # block 0 decodes (held at the gate) while block 1 is asked for
            assert _decode_threads(), "the previous block's decode should be running now"
            self.gate.set()
        return super().next_block()


def test_decode_runs_while_the_next_block_computes() -> None:
    gate = threading.Event()
    r = ArtifactRenderer(_GatedGenerator(gate), _Decoder(gate), None, 4, overlap_decode=True)
    frames = [r.block_frames(0, b) for b in range(4)]
    assert [float(f.flat[0]) for f in frames] == [0.0, 1.0, 2.0, 3.0]
    assert not _decode_threads()


@pytest.mark.parametrize("fail", [RuntimeError("DiT out of memory"), KeyboardInterrupt()])
def test_a_failing_dit_leaves_no_decode_thread_behind(fail: BaseException) -> None:
    """The DiT fails (or Ctrl-C lands) while the previous block decodes: the decode finishes, its
    thread is joined, and the failure reaches the caller."""
    dec = _Decoder()
    r = ArtifactRenderer(_Generator(fail, at=2), dec, None, 4, overlap_decode=True)
    r.block_frames(0, 0)
    with pytest.raises(type(fail)):
        r.block_frames(0, 1)  # decodes block 1 while computing block 2, which fails
    assert dec.seen == [0.0, 1.0] and not _decode_threads()


def test_a_failing_decoder_reaches_the_caller() -> None:
    r = ArtifactRenderer(_Generator(), _Decoder(fail_on=1.0), None, 4, overlap_decode=True)
    r.block_frames(0, 0)
    with pytest.raises(RuntimeError, match="decoder failed"):
        r.block_frames(0, 1)
    assert not _decode_threads()


def test_the_last_block_of_a_clip_is_not_computed_ahead() -> None:
    """At a clip's end nothing is computed ahead, so a checkpoint's state is the serial one."""
    gen = _Generator()
    r = ArtifactRenderer(gen, _Decoder(), None, 4, overlap_decode=True)
    for b in range(4):
        r.block_frames(0, b)
    assert gen.n == 4 and r._ahead is None
