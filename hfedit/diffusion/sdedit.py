"""SDEdit (Meng et al. 2021) image-to-image translation, with the plain backbone or a
rectified one.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hfedit.diffusion.schedule import Schedule, posterior_mean, q_sample



# --------------------------------------------------------------------------------- SDEdit
@torch.no_grad()
def sdedit(denoiser, schedule: Schedule, x0: Tensor, strength: float, num_steps: int,
           eta: float = 1.0, noise: Optional[Tensor] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """SDEdit (Meng et al. 2021) image-to-image translation of ``x0`` (B, C, H, W) in [-1, 1].

    Of the ``num_steps`` strided timesteps, start at the first ``t_k <= strength * (T - 1)``:
    ``x_{t_k} ~ q(x_{t_k} | x0) = N(sqrt(abar) x0, (1 - abar) I)``, then ancestral sampling
    down to 0 with fresh noise, ``x_s = mu_t(x_t; denoiser) + sigma_t z`` (x0 estimate clipped
    to [-1, 1], as generation does). ``denoiser`` is any ``eps = d(x_t, t)``; with a rectifier
    it is the modulated model conditioned on ``x0`` (``ModulatedDenoiser(...).conditioned(x0)``).
    ``noise`` (>= N - k + 1, B, C, H, W): the q-sample's noise then each step's; otherwise drawn
    from ``generator``. ``strength`` in (0, 1]: larger = freer (1 = sampling from pure noise).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    timesteps = schedule.timesteps(num_steps)
    t_max = strength * (schedule.num_train_timesteps - 1)
    start = next(i for i, t in enumerate(timesteps) if t <= t_max)
    used = timesteps[start:]
    if noise is None:
        noise = torch.randn((len(used) + 1, *x0.shape), generator=generator)
    if noise.shape[0] < len(used) + 1 or noise.shape[1:] != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; need ({len(used) + 1}, "
                         f"{', '.join(map(str, x0.shape))})")
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    t0 = torch.full((x0.shape[0],), used[0], dtype=torch.long, device=x0.device)
    x = q_sample(schedule, x0, t0, noise[0])
    for i, (t, s) in enumerate(zip(used, Schedule.prev_timesteps(used))):
        coef = schedule.step_coefficients(t, s, eta)
        x = posterior_mean(coef, x, denoiser(x, t), clip_x0=True)
        if coef.sigma > 0:
            x = x + coef.sigma * noise[i + 1]
    return x
