"""Talk sessions (pipeline/session.py) against a fake renderer and the tiny wav2vec2: bad input, idle
modes and their pacing, barge-in, threads, features, latency and telemetry. Fast: no DiT, no decoder.

The fake renderer's frames carry the mean of the block's features (128 for silence), and it records
every block's features, so a test sees which speech (or none) each block was rendered from.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from liveavatar_lite.conditioning.audio_features import extract_audio_features, load_wav2vec
from liveavatar_lite.conditioning.speech import resample
from liveavatar_lite.conditioning.streaming_features import (
    StreamingWindow,
    samples_needed,
    streaming_block_features,
    utterance_frames,
)
from liveavatar_lite.config import PRESETS
from liveavatar_lite.errors import UserError
from liveavatar_lite.pipeline.pipeline import Pipeline
from liveavatar_lite.pipeline.session import SessionBlock

RATE = 16000


class FakeSessionRenderer:
    blocks_per_clip = 4

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.calls: list[tuple[int, int, torch.Tensor]] = []
        self.closed = False

    def block_frames(self, clip: int, block: int, audio: Any = None) -> np.ndarray:
        assert audio is not None and tuple(audio.shape[1:]) == (PRESETS["tiny"].dit.audio_dim, 12)
        done = len(self.calls)
        assert (clip, block) == divmod(done, self.blocks_per_clip), "blocks out of order"
        self.calls.append((clip, block, audio.clone()))
        level = 128 + int(round(100 * np.tanh(float(audio.float().mean()) * 50)))
        return np.full((12, self.height, self.width, 3), level, np.uint8)

    def close(self) -> None:
        self.closed = True


class FakeSessionBackend:
    """What Pipeline.session needs from a backend: build_session, the audio encoder, silence features."""

    def __init__(self, encoder: Any) -> None:
        self.encoder, self.builds, self.renderers = encoder, 0, []
        self.encoder_out = 0  # session_audio_encoder minus release calls
        self.feature_dtype = torch.float32

    def identity(self) -> str:
        return "fake"

    def build(self, inputs: Any) -> Any:
        raise AssertionError("a session must not build a render")

    def build_session(self, inputs: Any) -> FakeSessionRenderer:
        self.builds += 1
        self.renderers.append(FakeSessionRenderer(inputs.height, inputs.width))
        return self.renderers[-1]

    def session_audio_encoder(self) -> Any:
        self.encoder_out += 1
        return self.encoder

    def release_session_audio_encoder(self) -> None:
        self.encoder_out -= 1

    def silence_features(self, frames: int) -> torch.Tensor:
        cfg = PRESETS["tiny"].dit
        return torch.zeros(cfg.audio_layers, cfg.audio_dim, frames)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tiny_components import write_tiny_wav2vec

    folder = write_tiny_wav2vec(tmp_path_factory.mktemp("w2v") / "w2v", PRESETS["tiny"].wav2vec, seed=0)
    return load_wav2vec(folder)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from media_fixtures import write_photo

    return write_photo(tmp_path_factory.mktemp("photo") / "p.png")


@pytest.fixture
def pipe(encoder: Any) -> Pipeline:
    return Pipeline(FakeSessionBackend(encoder), progress=False, size="64*64")


def speech(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """A voiced-speech stand-in: 140 Hz harmonics under a 4 Hz syllable envelope, plus a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * 140 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + seed)
    return (0.15 * voice * env + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def drain(sess: Any) -> list[SessionBlock]:
    out = []
    while (b := sess.next_block(timeout=0)) is not None:
        out.append(b)
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("samples, rate, says", [
    ([0.0, 0.1], RATE, "numpy array"),
    (np.zeros((100, 2), np.float32), RATE, "mono"),
    (np.zeros((2, 3, 4), np.float32), RATE, "mono"),
    (np.zeros(100, np.float64), RATE, "float32"),
    (np.zeros(100, np.int32), RATE, "float32"),
    (np.array([0.0, np.nan], np.float32), RATE, "NaN"),
    (np.array([0.0, np.inf], np.float32), RATE, "NaN"),
    (np.array([0.0, 1.5], np.float32), RATE, "[-1, 1]"),
    (np.zeros(100, np.float32), 0, "8000 to 192000"),
    (np.zeros(100, np.float32), -16000, "8000 to 192000"),
    (np.zeros(100, np.float32), 10**9, "8000 to 192000"),
    (np.zeros(100, np.float32), 16000.0, "integer"),
    (np.zeros(100, np.float32), True, "integer"),
    (np.zeros(100, np.float32), 44101, "unusual sample rate"),
])
def test_bad_feed_is_one_line_and_changes_nothing(pipe: Pipeline, photo: Path, samples: Any, rate: Any,
                                                  says: str) -> None:
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        sess.feed(speech(0.3), RATE)
        before = sess.stats()
        with pytest.raises(UserError) as e:
            sess.feed(samples, rate)
        assert says in one_line(e)
        assert sess.stats() == before
        sess.end()  # the good speech before the bad feed is intact: 0.3 s -> one clip
        assert len(drain(sess)) == utterance_frames(int(0.3 * RATE)) // 12


def test_rate_change_and_overlong_utterance_are_refused(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        sess.feed(speech(0.2), RATE)
        with pytest.raises(UserError) as e:
            sess.feed(speech(0.2, rate=48000), 48000)
        assert "end() before" in one_line(e)
        sess._max_samples = 8000  # (a small limit instead of ten minutes of speech)
        with pytest.raises(UserError) as e:
            sess.feed(speech(0.5), RATE)
        assert "at most" in one_line(e)
        sess.end()
        sess.feed(speech(0.2, rate=48000), 48000)  # a new utterance may use another rate


def test_after_close_every_input_is_refused(pipe: Pipeline, photo: Path) -> None:
    sess = pipe.session(photo, "a person talking", idle="pause")
    sess.close()
    sess.close()  # idempotent
    for call in (lambda: sess.feed(speech(0.1), RATE), sess.end, sess.interrupt):
        with pytest.raises(UserError) as e:
            call()
        assert "closed" in one_line(e)
    assert sess.next_block(timeout=0) is None and list(sess) == []


@pytest.mark.parametrize("kw, says", [
    ({"idle": "sleep"}, "idle must be"),
    ({"lookahead_s": 0.01}, "lookahead_s"),
    ({"lookahead_s": "1"}, "lookahead_s"),
    ({"context_s": -1.0}, "context_s"),
    ({"seed": -1}, "seed"),
    ({"size": "banana"}, "size"),
])
def test_bad_session_arguments_are_one_line(pipe: Pipeline, photo: Path, kw: dict, says: str) -> None:
    with pytest.raises(UserError) as e:
        pipe.session(photo, "a person talking", **kw)
    assert says in one_line(e).lower() or says in str(e.value)
    with pipe.session(photo, "a person talking", idle="pause"):  # nothing was claimed by the failure
        pass


def test_missing_photo_and_bad_prompt(pipe: Pipeline, photo: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        pipe.session(tmp_path / "nope.png", "a person talking")
    one_line(e)
    with pytest.raises(UserError) as e:
        pipe.session(photo, "bad\x00prompt")
    one_line(e)


# ------------------------------------------------------------------------------------------ the Pipeline

def test_a_session_holds_the_pipeline_until_closed(pipe: Pipeline, photo: Path, tmp_path: Path) -> None:
    sess = pipe.session(photo, "a person talking", idle="pause")
    with pytest.raises(UserError) as e:  # a render meanwhile: refused with one line, before any work
        pipe.render(image=photo, audio=tmp_path / "none.wav", prompt="p", out=tmp_path / "o.mp4")
    assert "rendering in another thread" in one_line(e)
    with pytest.raises(UserError):
        pipe.session(photo, "a person talking")
    sess.close()
    assert pipe.backend.encoder_out == 0 and pipe.backend.renderers[0].closed
    with pytest.raises(UserError) as e:  # free again: now the missing speech file is the complaint
        pipe.render(image=photo, audio=tmp_path / "none.wav", prompt="p", out=tmp_path / "o.mp4")
    assert "rendering" not in str(e.value)


# ------------------------------------------------------------------------------------------ idle modes

def test_listen_renders_silence_paced_at_real_time(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="listen") as sess:
        blocks, times = [], []
        start = time.monotonic()
        for _ in range(4):
            blocks.append(sess.next_block())
            times.append(time.monotonic())
    assert all(b.utterance is None and b.latency_s is None and b.features == "silence" for b in blocks)
    assert all(int(b.frames[0, 0, 0, 0]) == 128 for b in blocks)  # silence features
    assert all(b.frames.shape[1:] == (sess.height, sess.width, 3) and b.fps == sess.fps == 25 for b in blocks)
    assert [b.frames.shape[0] for b in blocks] == [9, 12, 12, 12]
    assert [(b.clip, b.block) for b in blocks] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # never more than one block ahead of playback: block k is rendered no earlier than when the
    # player (started when block 0 was ready, after `start`) reaches the start of block k - 1
    for k in range(1, 4):
        assert times[k] - start >= blocks[k - 1].audio_start_s


def test_pause_renders_nothing_until_speech(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        assert sess.next_block(timeout=0.05) is None
        assert sess.stats()["blocks"] == 0 and pipe.backend.renderers[0].calls == []
        wave = speech(1.0)
        sess.feed(wave, RATE)
        sess.end()
        blocks = drain(sess)
    assert len(blocks) == utterance_frames(len(wave)) // 12 == 4
    assert all(b.utterance == 0 and b.features == "exact" and b.latency_s >= 0 for b in blocks)


def test_listen_idles_while_the_first_block_waits_for_its_lookahead(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="listen") as sess:
        sess.feed(speech(0.3), RATE)  # less than a block plus the lookahead: the avatar listens
        b = sess.next_block()
        assert b.utterance is None
        sess.feed(speech(0.7, seed=1), RATE)  # now 1.0 s >= 0.48 + 0.4: the utterance starts
        b = sess.next_block()
        assert b.utterance == 0 and b.features == "streaming"


# ------------------------------------------------------------------------------------------ barge-in

@pytest.mark.parametrize("idle", ["pause", "listen"])
def test_interrupt_drops_the_rest_and_the_next_utterance_renders(pipe: Pipeline, photo: Path, idle: str,
                                                                tmp_path: Path) -> None:
    with pipe.session(photo, "a person talking", idle=idle, telemetry=tmp_path / "t.jsonl") as sess:
        sess.feed(speech(3.0), RATE)  # not ended: its blocks render from streaming features
        first = [sess.next_block(), sess.next_block()]
        assert [b.utterance for b in first] == [0, 0]
        sess.interrupt()
        if idle == "pause":
            assert sess.next_block(timeout=0.05) is None  # the rest of utterance 0 is gone, nothing to render
        else:
            assert sess.next_block().utterance is None  # back to listening (paced: waits for its turn)
        wave = speech(1.2, seed=5)
        sess.feed(wave, RATE)
        sess.end()
        nxt = [b for b in (sess.next_block(timeout=2.0) for _ in range(8)) if b is not None and b.utterance == 1]
        assert sess.stats()["utterances"] == 2
    assert len(nxt) == utterance_frames(len(wave)) // 12
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [x["utterances"] for x in lines if x["event"] == "interrupt"] == [[0]]
    renderer = pipe.backend.renderers[0]
    assert pipe.backend.builds == 1  # no reload, no restart: the same renderer, blocks in order
    done = [(c, b) for c, b, _ in renderer.calls]
    assert done == [divmod(i, 4) for i in range(len(done))]
    # utterance 1's blocks are its whole speech's features, from its own start
    feats = extract_audio_features(pipe.backend.encoder, wave)
    k0 = next(i for i, (c, b, _) in enumerate(renderer.calls) if (c, b) == (nxt[0].clip, nxt[0].block))
    for j, (_, _, a) in enumerate(renderer.calls[k0:k0 + len(nxt)]):
        assert torch.equal(a, feats[..., 12 * j:12 * j + 12])
    # its speech plays over its blocks, from its first sample
    played = np.concatenate([b.audio for b in nxt])
    assert np.array_equal(played[: len(wave)], wave)


def test_end_and_interrupt_without_speech_do_nothing(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        sess.end()
        sess.interrupt()
        sess.feed(speech(0.05), RATE)  # shorter than 0.1 s: renders nothing
        sess.end()
        assert sess.next_block(timeout=0.05) is None and sess.stats()["utterances"] == 1


# ------------------------------------------------------------------------------------------ threads

def test_feed_and_close_from_other_threads(pipe: Pipeline, photo: Path) -> None:
    sess = pipe.session(photo, "a person talking", idle="pause")
    wave = speech(1.5)
    total = utterance_frames(len(wave)) // 12

    def feeder() -> None:
        for i in range(0, len(wave), 320):  # 20 ms pieces, as fast as they come
            sess.feed(wave[i:i + 320], RATE)
        sess.end()

    def closer() -> None:
        while sess.stats()["blocks"] < total:  # waits for a state, not a duration
            time.sleep(0.01)
        sess.close()

    threads = [threading.Thread(target=feeder), threading.Thread(target=closer)]
    for t in threads:
        t.start()
    blocks = list(sess)  # blocks in this thread until close()
    for t in threads:
        t.join()
    assert len(blocks) == total and all(b.utterance == 0 for b in blocks)
    assert pipe.backend.encoder_out == 0


# ------------------------------------------------------------------------------------------ features

def test_streaming_blocks_get_the_streaming_features_whatever_the_chunking(pipe: Pipeline, photo: Path) -> None:
    wave = speech(2.5)
    window = StreamingWindow()
    used: dict[int, list] = {}
    for chunk in (320, 8000):
        with pipe.session(photo, "a person talking", idle="pause") as sess:
            blocks = []
            for i in range(0, len(wave), chunk):
                sess.feed(wave[i:i + chunk], RATE)
                blocks += drain(sess)
        used[chunk] = [(b.features, a) for b, (_, _, a) in zip(blocks, pipe.backend.renderers[-1].calls)]
        # every block whose speech + lookahead had arrived rendered, from the streaming features
        assert len(blocks) == max(k for k in range(20) if samples_needed(12 * k, window) <= len(wave))
        for k, (kind, a) in enumerate(used[chunk]):
            assert kind == "streaming"
            assert torch.equal(a, streaming_block_features(pipe.backend.encoder, wave, 12 * k, 12 * k + 12, window))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(used[320], used[8000]))


def test_resampled_speech_matches_the_whole_file_resampled(pipe: Pipeline, photo: Path) -> None:
    wave48 = speech(1.0, rate=48000)
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        for i in range(0, len(wave48), 960):  # 20 ms at 48 kHz
            sess.feed(wave48[i:i + 960], 48000)
        sess.end()
        blocks = drain(sess)
    wave = resample(wave48, 48000)
    played = np.concatenate([b.audio for b in blocks])
    # streaming resampling = one resample of the whole within float rounding (test_session_features)
    assert np.abs(played[: len(wave)] - wave).max() < 1e-6
    calls = pipe.backend.renderers[0].calls
    feats = extract_audio_features(pipe.backend.encoder, wave)
    assert max(float((a - feats[..., 12 * k:12 * k + 12]).abs().max()) for k, (_, _, a) in enumerate(calls)) < 1e-3


def test_int16_and_column_input(pipe: Pipeline, photo: Path) -> None:
    wave = speech(0.6)
    pcm = np.round(wave * 32767).astype(np.int16)
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        sess.feed(pcm[:, None][:5000], RATE)
        sess.feed(pcm[5000:], RATE)
        sess.end()
        blocks = drain(sess)
    played = np.concatenate([b.audio for b in blocks])
    assert np.array_equal(played[: len(pcm)], pcm.astype(np.float32) / 32768)


# ------------------------------------------------------------------------------------------ latency

def test_latency_in_blocks_stats_and_telemetry(pipe: Pipeline, photo: Path, tmp_path: Path) -> None:
    tel = tmp_path / "talk.jsonl"
    wave = speech(2.0)
    with pipe.session(photo, "a person talking", idle="pause", telemetry=tel) as sess:
        t_before = time.monotonic()
        sess.feed(wave, RATE)
        blocks = drain(sess)  # the streaming blocks
        sess.end()
        blocks += drain(sess)
        waited = time.monotonic() - t_before
        stats = sess.stats()
    assert all(b.latency_s is not None and 0 <= b.latency_s <= waited for b in blocks)
    assert stats["speech_blocks"] == len(blocks) and stats["latency_max_s"] == round(max(b.latency_s for b in blocks), 4)
    lines = [json.loads(x) for x in tel.read_text().splitlines()]
    assert lines[0]["event"] == "session" and lines[-1]["event"] == "session_summary"
    recs = [x for x in lines if x["event"] == "block"]
    assert [r["latency_s"] for r in recs] == [round(b.latency_s, 4) for b in blocks]
    assert [r["utterance"] for r in recs] == [0] * len(blocks)
    assert {r["features"] for r in recs} == {"streaming", "exact"}


def test_backends_without_sessions_refuse_them_in_one_line(photo: Path) -> None:
    from liveavatar_lite.pipeline.render import ArtifactBackend

    class Plain:  # a backend that only renders files (a test fake, a wrapper)
        def identity(self) -> str:
            return "plain"

    with pytest.raises(UserError) as e:
        Pipeline(Plain(), progress=False, size="64*64").session(photo, "a person talking")
    assert "cannot run talk sessions" in one_line(e)

    class Ranks(ArtifactBackend):  # what a pipeline of ranks (multirank.PipelineBackend) looks like
        def build(self, inputs: Any) -> Any:
            raise AssertionError

    ranks = object.__new__(Ranks)  # refused before anything of it is used
    with pytest.raises(UserError) as e:
        ranks.build_session(None)
    assert "--ranks" in one_line(e)


def test_session_block_is_exported() -> None:
    import liveavatar_lite
    from liveavatar_lite.pipeline.request import StreamBlock

    assert liveavatar_lite.SessionBlock is SessionBlock and issubclass(SessionBlock, StreamBlock)


def test_a_failed_block_fails_the_session_in_one_line(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="listen") as sess:
        renderer = pipe.backend.renderers[0]
        renderer.block_frames = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))
        with pytest.raises(RuntimeError):
            sess.next_block()
        with pytest.raises(UserError) as e:  # the models' state is mid-block: no further block
            sess.next_block()
        assert "failed (CUDA error: out of memory)" in one_line(e)
    assert pipe.backend.encoder_out == 0  # closing still frees everything


def test_next_block_timeout_is_checked_and_bounds_waiting_for_another_thread(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="pause") as sess:
        for bad in ("1", float("nan"), True):
            with pytest.raises(UserError) as e:
                sess.next_block(bad)
            assert "timeout" in one_line(e)
        waiting = threading.Thread(target=lambda: list(sess))  # holds the turn, waiting for speech
        waiting.start()
        while not sess._turn.locked():  # a state: the other thread is iterating
            time.sleep(0.01)
        assert sess.next_block(timeout=0.05) is None  # returns within its timeout instead of queueing
        sess.close()
        waiting.join()


def test_an_utterance_under_way_waits_for_its_speech_without_idling(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="listen") as sess:
        sess.feed(speech(1.2), RATE)  # enough for block 0 only (0.48 + 0.4 s); not ended
        assert sess.next_block().utterance == 0
        # listening would render an idle block within one block (0.48 s); a started utterance waits
        assert sess.next_block(timeout=1.0) is None
        sess.end()
        assert sess.next_block(timeout=1.0).utterance == 0


def test_close_awaits_the_block_in_flight_and_drops_it(pipe: Pipeline, photo: Path) -> None:
    with pipe.session(photo, "a person talking", idle="listen") as sess:
        renderer = pipe.backend.renderers[0]
        entered, release = threading.Event(), threading.Event()
        plain = renderer.block_frames

        def slow(*a: Any, **k: Any) -> np.ndarray:
            entered.set()
            release.wait()
            return plain(*a, **k)

        renderer.block_frames = slow
        got: list = []
        it = threading.Thread(target=lambda: got.append(sess.next_block()))
        it.start()
        entered.wait()  # the block is rendering in the other thread
        closer = threading.Thread(target=sess.close)
        closer.start()
        while not sess.closed:  # a state: close() has begun
            time.sleep(0.01)
        assert closer.is_alive() and pipe.backend.encoder_out == 1  # it waits for the block in flight
        release.set()
        closer.join()
        it.join()
    assert got == [None] and renderer.calls and pipe.backend.encoder_out == 0


@pytest.mark.parametrize("kw", [dict(image=None), dict(prompt=None), dict(prompt=b"x"), dict(seed=1.5),
                                dict(seed=np.bool_(True)), dict(seed=2**64)])
def test_session_arguments_of_the_wrong_type_fail_in_one_line_first(kw: dict) -> None:
    """As render and stream (issue 25, class 5): each argument is checked before the backend is used."""
    from liveavatar_lite.pipeline.pipeline import Pipeline

    class NoBackend:
        loads: dict = {}

    args = dict(image="/nonexistent/photo.png", prompt="a person talking") | kw
    with pytest.raises(UserError) as e:
        Pipeline(NoBackend(), progress=False, size="64*64").session(args.pop("image"), args.pop("prompt"), **args)
    assert "\n" not in str(e.value)
