"""CausalGenerator: seeding, clip/block bookkeeping, ring rolling, resume."""
import pytest
import torch
from dit_fixtures import two_clip_case

from liveavatar_lite.config import PRESETS
from liveavatar_lite.pipeline.generator import CausalGenerator, GenerationInputs

CFG = PRESETS["tiny"].dit


@pytest.fixture(scope="module")
def setup():
    return two_clip_case(CFG)


def _gen(setup, seed=7, **kw):
    model, gi = setup
    return CausalGenerator(model, gi, seed=seed, **kw)


def test_one_seed_gives_one_video(setup):
    a = _gen(setup)
    outs = [a.next_block() for _ in range(2)]
    b = _gen(setup)
    assert all(torch.equal(o.latents, b.next_block().latents) for o in outs)
    c = _gen(setup, seed=8)
    assert not torch.equal(c.next_block().latents, outs[0].latents)


def test_sink_offset_draws_span_4_to_30_and_block0_ignores_them(setup):
    # block 0 starts at frame 0 < 30 - d for every d, so the ref RoPE (frame 30) does not depend on d
    fixed = _gen(setup, sink_offset=4)
    drawn = _gen(setup)
    assert torch.equal(fixed.next_block().latents, drawn.next_block().latents)
    offsets = [drawn._draw_sink_offset() for _ in range(200)]
    assert min(offsets) == 4 and max(offsets) == 30


def test_clip_bookkeeping_and_noise_seeding(setup):
    gen = _gen(setup, num_clips=2)
    assert gen.num_clips == 2 and gen.total_blocks == 8
    outs = [gen.next_block() for _ in range(5)]
    assert [(o.clip, o.block, o.clip_done) for o in outs][3:5] == [(0, 3, True), (1, 0, False)]
    assert not gen.done
    # clip noise is randn(16, 12, h, w) from a generator seeded seed + clip
    want = torch.randn(16, 12, 8, 8, generator=torch.Generator().manual_seed(7 + 1))
    gen2 = _gen(setup)
    gen2.clip = 1
    gen2._begin_clip()
    assert torch.equal(gen2._noise, want)
    # block 4 starts at latent frame 12 = the ring capacity: every step's ring has wrapped
    assert all(r.active == r.capacity and r.write_slot == 0 for r in gen.runner.rings)


def test_resume_continues_bitwise(setup):
    full = _gen(setup, num_clips=2)
    want = [full.next_block().latents for _ in range(5)]
    first = _gen(setup, num_clips=2)
    for _ in range(3):
        first.next_block()
    snap = first.state_dict()  # mid-clip; the resumed run crosses the clip boundary
    resumed = _gen(setup, num_clips=2)
    resumed.load_state_dict(snap)
    got = [resumed.next_block().latents for _ in range(2)]
    assert all(torch.equal(g, w) for g, w in zip(got, want[3:]))
    with pytest.raises(ValueError, match="seed"):
        _gen(setup, seed=9).load_state_dict(snap)


def test_audio_shorter_than_a_clip_is_refused(setup):
    model, gi = setup
    short = GenerationInputs(gi.text, gi.audio[..., :40], gi.ref_latents, gi.motion_latents)
    with pytest.raises(ValueError, match="fewer than one clip"):
        CausalGenerator(model, short, seed=0)


def test_vae_refresher_slides_history_like_upstream():
    from liveavatar_lite.pipeline.generator import VaeMotionRefresher

    class FakeVAE:  # latents <-> pixels by repeating / subsampling, enough to check the bookkeeping
        def decode(self, z):
            t = z.shape[2]
            return torch.arange(1 + 4 * (t - 1), dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 3, -1, 2, 2)

        def encode(self, video):
            self.seen = video
            return torch.zeros(1, 16, 1 + (video.shape[2] - 1) // 4, 1, 1)

    vae = FakeVAE()
    r = VaeMotionRefresher(vae, torch.zeros(16, 92, 1, 1), torch.full((3, 2, 2), -1.0))
    new = r(torch.zeros(16, 12, 1, 1))
    assert new.shape == (16, 92, 1, 1)
    total = 1 + 4 * (92 + 12 - 1)  # 413 decoded frames
    assert r.frames.shape[1] == 45 and r.frames[0, 0, 0, 0] == total - 45
    assert vae.seen.shape[2] == 365 and torch.all(vae.seen[0, :, :320] == -1)
    assert vae.seen[0, 0, -1, 0, 0] == total - 1


def test_latents_too_small_for_framepack_are_refused(setup):
    model, gi = setup
    small = GenerationInputs(gi.text, gi.audio, gi.ref_latents[..., :4, :4], gi.motion_latents[..., :4, :4])
    with pytest.raises(ValueError, match="even sizes >= 8"):
        CausalGenerator(model, small, seed=0).next_block()


def test_misshaped_audio_is_one_clear_error(setup):
    model, gi = setup
    bad = GenerationInputs(gi.text, gi.audio[:24], gi.ref_latents, gi.motion_latents)
    with pytest.raises(ValueError, match=r"audio has shape \[24, 32, 96\]"):
        CausalGenerator(model, bad, seed=0)
