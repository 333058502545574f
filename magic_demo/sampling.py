"""Flow-matching schedule and Euler sampler (k-diffusion style: a schedule builder and a pure sampler).

The Magic 1-For-1 schedule is the diffusers flow-matching scheduler with a static shift (5.0):
sigmas = linspace(1, 0, N+1), shifted sigma' = s*sigma / (1 + (s-1)*sigma), timesteps = 1000 * sigma'.
For N = 4 that gives [1.0, 0.9375, 0.8333, 0.625, 0.0].
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

MAX_STEPS = 64  # the paper's Table 1 samples the base model with 56 steps
DEFAULT_SHIFT = 5.0


class Cancelled(Exception):
    """Raised inside a sampler when the cancel token was set; the current window is dropped."""


def make_scheduler(shift: float = DEFAULT_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sigmas[N+1] ending in 0, timesteps[N]) of the shifted flow-matching schedule, in fp32."""
    if not 1 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps!r}")
    # The scheduler applies its own configured shift to the plain linear sigmas.
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, int(steps) + 1)[:-1])
    sigmas = scheduler.sigmas.to(torch.float32).clone()
    timesteps = scheduler.timesteps.to(torch.float32).clone()
    return sigmas, timesteps


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_euler(
    model: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Integrate dx/dsigma = v(x, sigma) from sigmas[0] to sigmas[-1] with Euler steps.

    One model call per step. The state is kept in fp32 whatever dtype the model runs in.
    `should_stop` is checked before every step (cooperative cancel): it raises Cancelled.
    """
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled before step {i + 1} of {len(sigmas) - 1}")
        velocity = model(x, sigmas[i]).to(torch.float32)
        x = x + velocity * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i, x)
    return x
