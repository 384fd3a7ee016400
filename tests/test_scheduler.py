"""The 4-step schedule equals diffusers FlowMatchEulerDiscreteScheduler(1000, shift=3).set_timesteps(4).

Expected values were printed from diffusers 0.42.1 (see tests/golden/README.md, section dit).
"""
import torch

from liveavatar_lite.pipeline.scheduler import FlowSchedule

DIFFUSERS_TIMESTEPS = [1000.0, 857.6923217773438, 602.1505737304688, 8.928571701049805]
DIFFUSERS_SIGMAS = [1.0, 0.857692301273346, 0.602150559425354, 0.008928571827709675, 0.0]


def test_live_avatar_schedule_is_bitwise_diffusers():
    s = FlowSchedule.live_avatar()
    assert s.timesteps.dtype == torch.float32 and s.sigmas.dtype == torch.float32
    assert s.timesteps.tolist() == DIFFUSERS_TIMESTEPS
    assert s.sigmas.tolist() == DIFFUSERS_SIGMAS
    assert len(s) == 4


def test_euler_step_runs_in_fp32_and_keeps_flow_dtype():
    s = FlowSchedule.live_avatar()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = s.step(1, v, x)
    assert torch.equal(out, x + (s.sigmas[2] - s.sigmas[1]) * v)
    assert s.step(0, v.bfloat16(), x).dtype == torch.bfloat16
    # the 4 steps integrate sigma from 1 to 0: a constant flow v from x gives x - v
    y = x.clone()
    for i in range(len(s)):
        y = s.step(i, v, y)
    torch.testing.assert_close(y, x - v, atol=1e-6, rtol=0)
