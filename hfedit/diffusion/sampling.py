"""Ancestral DDPM sampling with fresh noise: generation from pure noise and SDEdit.

Both run the same chain (:func:`ancestral_sample`), ``x_s = mu_t(x_t; denoiser) + sigma_t z``
with a fresh ``z ~ N(0, I)`` per step and the x0 estimate clipped to [-1, 1] as diffusers' DDPM
does; they differ only in where the chain starts. Pure tensor functions over any
``denoiser(x_t, t) -> eps`` and a :class:`Schedule`. Cost: one denoiser evaluation per step.
(Replaying *stored* maps is :func:`hfedit.diffusion.inversion.replay`.)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from hfedit.diffusion.inversion import DenoiserFn, Progress
from hfedit.diffusion.schedule import Schedule, posterior_mean, q_sample


def ancestral_sample(denoiser: DenoiserFn, schedule: Schedule, x_t: Tensor,
                     timesteps: Sequence[int], eta: float, noise: Callable[[int], Tensor],
                     clip_x0: bool = True, progress: Progress = None) -> Tensor:
    """From ``x_t`` (B, C, H, W) at ``timesteps[0]`` down to x0 through the descending
    ``timesteps``: ``x_s = mu_t(x_t; denoiser) + sigma_t z_i`` (``sigma_t`` of ``eta``,
    ALGORITHMS.md section 1). ``noise(i)`` gives ``z_i`` of step i, (B, C, H, W); it is called
    only where ``sigma_t > 0``, in step order (so a generator it draws from is used in that
    order). ``clip_x0``: clip each step's x0 estimate to [-1, 1]
    (:func:`hfedit.diffusion.schedule.posterior_mean`)."""
    x = x_t
    for i, (t, s) in enumerate(zip(timesteps, Schedule.prev_timesteps(list(timesteps)))):
        coef = schedule.step_coefficients(t, s, eta)
        x = posterior_mean(coef, x, denoiser(x, t), clip_x0=clip_x0)
        if coef.sigma > 0:
            x = x + coef.sigma * noise(i)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x


@torch.no_grad()
def ddpm_sample(
    denoiser: DenoiserFn,
    schedule: Schedule,
    shape: Sequence[int],
    num_steps: int,
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: str | torch.device = "cpu",
    progress: Progress = None,
    clip_x0: bool = True,
) -> Tensor:
    """Ancestral sampling from pure noise ``x_T ~ N(0, I)`` of ``shape`` (B, C, H, W) with fresh
    Gaussian maps (the generative model); ``clip_x0`` clips each step's x0 estimate to the data
    range, as diffusers' DDPM does. ``x_T`` and then each step's ``z`` are drawn from
    ``generator`` (on its device) and moved to ``device``."""
    gen_device = generator.device if generator is not None else device

    def draw(_: int = 0) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)

    return ancestral_sample(denoiser, schedule, draw(), schedule.timesteps(num_steps), eta, draw,
                            clip_x0=clip_x0, progress=progress)


@torch.no_grad()
def sdedit(denoiser: DenoiserFn, schedule: Schedule, x0: Tensor, strength: float, num_steps: int,
           eta: float = 1.0, noise: Optional[Tensor] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """SDEdit (Meng et al. 2021) image-to-image translation of ``x0`` (B, C, H, W) in [-1, 1].

    Of the ``num_steps`` strided timesteps, start at the first ``t_k <= strength * (T - 1)``:
    ``x_{t_k} ~ q(x_{t_k} | x0) = N(sqrt(abar) x0, (1 - abar) I)``, then ancestral sampling
    down to 0 with fresh noise (:func:`ancestral_sample`, x0 estimate clipped to [-1, 1], as
    generation does). ``denoiser`` is any ``eps = d(x_t, t)``; with a rectifier it is the
    modulated model conditioned on ``x0`` (``ModulatedDenoiser(...).conditioned(x0)``).
    ``noise`` (>= N - k + 1, B, C, H, W): the q-sample's noise then each step's; otherwise drawn
    from ``generator``. ``strength`` in (0, 1]: larger = freer (1 = sampling from pure noise).
    Cost: N - k denoiser evaluations.
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
    return ancestral_sample(denoiser, schedule, x, used, eta, lambda i: noise[i + 1])


__all__ = ["ancestral_sample", "ddpm_sample", "sdedit"]
