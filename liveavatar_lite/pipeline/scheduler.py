"""Live Avatar's 4-step flow-matching Euler schedule (diffusers FlowMatchEulerDiscreteScheduler,
num_train_timesteps=1000, shift=3, set_timesteps(4)), computed the same way, float for float.

The shift is applied twice, as upstream does: once to the 1000 training sigmas (fp32), whose
first/last values bound the inference range, and again to the 4 inference sigmas (fp64, then
stored as fp32). Result: t = [1000, 857.69, 602.15, 8.93], sigma = t/1000 plus a final 0.

    sched = FlowSchedule.live_avatar()
    for i, t in enumerate(sched.timesteps): x = sched.step(i, v, x)   # x += (s[i+1]-s[i]) * v
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _shift(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    """Timesteps [N] and sigmas [N+1] (fp32), and the Euler update between them."""

    timesteps: Tensor
    sigmas: Tensor

    @classmethod
    def create(cls, num_steps: int = 4, shift: float = 3.0, num_train_timesteps: int = 1000) -> FlowSchedule:
        """The schedule diffusers builds with FlowMatchEulerDiscreteScheduler(N, shift).set_timesteps(steps)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        n = num_train_timesteps
        train_t = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        train_sigmas = _shift(train_t / n, shift)  # fp32 torch math
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        t = np.linspace(sigma_max * n, sigma_min * n, num_steps)  # fp64
        sigmas = torch.from_numpy(_shift(t / n, shift)).to(torch.float32)
        timesteps = sigmas * n
        return cls(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))

    @classmethod
    def live_avatar(cls) -> FlowSchedule:
        return cls.create(num_steps=4, shift=3.0, num_train_timesteps=1000)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def step(self, i: int, flow: Tensor, sample: Tensor) -> Tensor:
        """Euler step i: sample + (sigma[i+1] - sigma[i]) * flow, in fp32, returned in flow's dtype."""
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (sample.float() + dt * flow).to(flow.dtype)
