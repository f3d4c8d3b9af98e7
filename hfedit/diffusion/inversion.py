"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., 2304.06140) and DDIM inversion.

Pure tensor functions over any ``denoiser(x_t, t) -> eps`` and a :class:`Schedule`:

* :func:`invert` extracts ``x_T`` and the noise maps ``z_t`` of an image, keeping the last step's
  map, so that :func:`replay` with the same denoiser returns the image exactly
  (ALGORITHMS.md section 1). Cost: N denoiser evaluations.
* :func:`replay` runs DDPM sampling with given maps through *any* denoiser (the backbone, or the
  backbone modulated by a rectifier): with a changed model this is an edit. Cost: N - skip.
* :func:`ddim_invert` / :func:`ddim_sample`: the deterministic baseline (section 2).
  :func:`ddim_invert` returns every state as an :class:`InversionResult` with zero maps, and
  :func:`replay` of it is DDIM sampling. Cost: N evaluations each.
* :func:`shift_maps`, :func:`colour_offset`: manipulations of the maps themselves.

Sampling with fresh noise (generation, SDEdit) is :mod:`hfedit.diffusion.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from hfedit.diffusion.schedule import Schedule, posterior_mean

DenoiserFn = Callable[[Tensor, int], Tensor]
# progress(step_index, num_steps) is called after every denoiser evaluation.
Progress = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class InversionResult:
    """Noise maps of a batch of images.

    ``xts``: (N, B, C, H, W), the noisy images ``x_{t_i}`` at the descending timesteps
    (``xts[0]`` is ``x_T``; ``xts[i]`` is where an edit with ``skip=i`` starts);
    ``zs``: (N, B, C, H, W), the map of each step ``t_i -> t_{i+1}`` (the last one included);
    ``timesteps``: the N descending timesteps; ``eta``: the variance scale used;
    ``eps``: (N, B, C, H, W) or None, the inverting denoiser's noise estimate
    ``eps_theta(xts[i], t_i)`` of every step (what the inversion computed anyway; the
    x0 estimates ``P_t`` that condition a rectifier along this trajectory follow from it).
    """

    xts: Tensor
    zs: Tensor
    timesteps: tuple[int, ...]
    eta: float
    eps: Optional[Tensor] = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to(self, *args, **kwargs) -> "InversionResult":
        eps = None if self.eps is None else self.eps.to(*args, **kwargs)
        return replace(self, xts=self.xts.to(*args, **kwargs), zs=self.zs.to(*args, **kwargs),
                       eps=eps)

    def select(self, index: Tensor | slice | Sequence[int]) -> "InversionResult":
        """The maps of a subset of the batch."""
        eps = None if self.eps is None else self.eps[:, index]
        return replace(self, xts=self.xts[:, index], zs=self.zs[:, index], eps=eps)


def per_image_noise(seeds: Sequence[int], num_steps: int, shape: Sequence[int]) -> Tensor:
    """(N, B, *shape) independent noise, image b drawn from ``torch.Generator`` seeded
    ``seeds[b]``: the same image gets the same maps in any batch."""
    return torch.stack(
        [torch.randn((num_steps, *shape), generator=torch.Generator().manual_seed(int(s)))
         for s in seeds],
        dim=1,
    )


def _check_skip(skip: int, num_steps: int) -> None:
    if not 0 <= skip < num_steps:
        raise ValueError(f"skip={skip} must be in [0, num_steps={num_steps})")


@torch.no_grad()
def invert(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x0: Tensor,
    num_steps: int,
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
    progress: Progress = None,
    noise: Optional[Tensor] = None,
) -> InversionResult:
    """Edit-friendly DDPM inversion of ``x0`` (B, C, H, W) in [-1, 1].

    1. ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_t`` with independent ``eps_t`` per t.
    2. From the noisiest t down: ``mu_t = mu(x_t, eps_theta(x_t, t))``,
       ``z_t = (x_s - mu_t) / sigma_t`` and ``x_s <- mu_t + sigma_t z_t`` (no float drift).
    3. The last step keeps its map; where ``sigma = 0`` the map is the residual ``x0 - mu``.

    ``noise`` (N, B, C, H, W) gives the ``eps_t`` explicitly (e.g. drawn per image from a seed
    derived from the image's id, so results do not depend on how images are batched);
    otherwise they are drawn from ``generator``.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta={eta} must be in (0, 1] for edit-friendly inversion")
    timesteps = schedule.timesteps(num_steps)
    prevs = Schedule.prev_timesteps(timesteps)
    # (N, B, C, H, W): independent noising of x0 at every timestep (not a Markov chain).
    if noise is None:
        noise = torch.randn((num_steps, *x0.shape), generator=generator, dtype=x0.dtype,
                            device=x0.device if generator is None else generator.device)
    elif noise.shape != (num_steps, *x0.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; need {(num_steps, *x0.shape)}")
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    xts = torch.empty_like(noise)
    for i, t in enumerate(timesteps):
        a = schedule.abar(t)
        xts[i] = a**0.5 * x0 + (1.0 - a) ** 0.5 * noise[i]
    zs = torch.empty_like(noise)
    epss = torch.empty_like(noise)  # (N, B, C, H, W): eps_theta(xts[i], t_i), kept
    x_t = xts[0]
    for i, (t, s) in enumerate(zip(timesteps, prevs)):
        coef = schedule.step_coefficients(t, s, eta)
        epss[i] = denoiser(x_t, t)
        mu = posterior_mean(coef, x_t, epss[i])
        x_s = xts[i + 1] if i + 1 < num_steps else x0
        zs[i] = (x_s - mu) / coef.noise_scale
        x_t = mu + coef.noise_scale * zs[i]
        if i + 1 < num_steps:
            xts[i + 1] = x_t
        if progress is not None:
            progress(i + 1, num_steps)
    return InversionResult(xts=xts, zs=zs, timesteps=tuple(timesteps), eta=eta, eps=epss)


@torch.no_grad()
def replay(
    denoiser: DenoiserFn,
    schedule: Schedule,
    inv: InversionResult,
    skip: int = 0,
    progress: Progress = None,
    repeat: int = 1,
) -> Tensor:
    """DDPM sampling driven by stored maps: ``x_s = mu_t(x_t; denoiser) + sigma_t z_t``.

    Starts at ``inv.xts[skip]`` and uses ``inv.zs[skip:]``: ``N - skip`` denoiser evaluations.
    With the denoiser used for :func:`invert` this returns the input image. ``repeat``: replay
    the B images' maps ``repeat`` times as one batch of ``repeat * B`` (sample ``k * B + b`` is
    image b; e.g. one copy per attribute), without storing the repeated maps.
    """
    _check_skip(skip, inv.num_steps)
    if repeat < 1:
        raise ValueError(f"repeat={repeat} must be >= 1")
    timesteps = list(inv.timesteps)
    prevs = Schedule.prev_timesteps(timesteps)
    x_t = inv.xts[skip].repeat(repeat, 1, 1, 1)  # (repeat*B, C, H, W)
    for i in range(skip, inv.num_steps):
        coef = schedule.step_coefficients(timesteps[i], prevs[i], inv.eta)
        mu = posterior_mean(coef, x_t, denoiser(x_t, timesteps[i]))
        x_t = mu + coef.noise_scale * inv.zs[i].repeat(repeat, 1, 1, 1)
        if progress is not None:
            progress(i + 1 - skip, inv.num_steps - skip)
    return x_t


def _ddim_up(schedule: Schedule, x_s: Tensor, eps: Tensor, s: int, t: int) -> Tensor:
    """One DDIM inversion step from level ``s`` up to the noisier ``t`` (``s = -1``: x0):
    ``x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps`` with
    ``x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s)`` and ``eps = eps_theta(x_s, t)``."""
    a_s, a_t = schedule.abar(s), schedule.abar(t)
    x0_hat = (x_s - (1.0 - a_s) ** 0.5 * eps) / a_s**0.5
    return a_t**0.5 * x0_hat + (1.0 - a_t) ** 0.5 * eps


@torch.no_grad()
def ddim_invert(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x0: Tensor,
    num_steps: Optional[int] = None,
    progress: Progress = None,
    *,
    timesteps: Optional[Sequence[int]] = None,
) -> InversionResult:
    """Deterministic DDIM inversion x0 -> x_T (eta = 0, run backwards), N evaluations, as an
    :class:`InversionResult` that :func:`replay` turns into DDIM sampling (section 2).

    Inverts through ``schedule.timesteps(num_steps)``, or through the given descending
    ``timesteps`` (e.g. the Markovian baseline's levels down from its ``t0``,
    :func:`hfedit.training.edits.chain_timesteps`); give exactly one of the two.
    Each step evaluates the model at the *next* (noisier) timestep on the current sample:
    ``x_t = sqrt(abar_t) x0_hat(x_s) + sqrt(1 - abar_t) eps_theta(x_s, t)``.
    ``xts[i]`` (N, B, C, H, W) is the state at the descending ``timesteps[i]`` (``xts[0] = x_T``,
    the end of the inversion; ``skip=i`` starts the sampling there, DiffusionCLIP's partial
    inversion to ``t0``); ``zs`` are zeros (no memory per step) and ``eta = 0``, so ``replay``
    adds nothing to each posterior mean: it *is* DDIM sampling. ``eps`` is None: the inversion
    evaluated the model at ``(x_s, t)``, not at the stored ``(x_t, t)``, so a
    trajectory-conditioned edit computes ``P_t`` of the states itself.
    """
    if (num_steps is None) == (timesteps is None):
        raise ValueError(f"ddim_invert: give num_steps ({num_steps}) or timesteps ({timesteps}), "
                         "not both and not neither")
    if timesteps is None:
        timesteps = schedule.timesteps(num_steps)
    timesteps = [int(t) for t in timesteps]
    T = schedule.num_train_timesteps
    if not timesteps or any(not 0 <= t < T for t in timesteps) \
            or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps={timesteps} must be strictly descending, in [0, {T})")
    n = len(timesteps)
    ascending = timesteps[::-1]
    prevs = Schedule.prev_timesteps(timesteps)[::-1]  # level s each step starts from
    states = []
    x = x0
    for i, (t, s) in enumerate(zip(ascending, prevs)):
        x = _ddim_up(schedule, x, denoiser(x, t), s, t)
        states.append(x)
        if progress is not None:
            progress(i + 1, n)
    xts = torch.stack(states[::-1])  # (N, B, C, H, W), descending t
    zs = x0.new_zeros((1, *x0.shape)).expand(n, *x0.shape)  # no memory per step
    return InversionResult(xts=xts, zs=zs, timesteps=tuple(timesteps), eta=0.0, eps=None)


@torch.no_grad()
def ddim_sample(
    denoiser: DenoiserFn, schedule: Schedule, x_T: Tensor, num_steps: int, progress: Progress = None
) -> Tensor:
    """Deterministic DDIM sampling (eta = 0) from ``x_T`` (B, C, H, W); N evaluations."""
    timesteps = schedule.timesteps(num_steps)
    x = x_T
    for i, (t, s) in enumerate(zip(timesteps, Schedule.prev_timesteps(timesteps))):
        x = posterior_mean(schedule.step_coefficients(t, s, 0.0), x, denoiser(x, t))
        if progress is not None:
            progress(i + 1, num_steps)
    return x


# ------------------------------------------------------------------- manipulations of maps
def shift_maps(inv: InversionResult, dx: int, dy: int) -> InversionResult:
    """Translate ``x_T`` (every stored x_t) and every map by (dx, dy) pixels, circularly.

    Replaying the shifted maps gives a shifted image (the paper's Fig. "shift").
    """
    dims = (-1, -2)
    return replace(
        inv,
        xts=torch.roll(inv.xts, shifts=(dx, dy), dims=dims),
        zs=torch.roll(inv.zs, shifts=(dx, dy), dims=dims),
        eps=None,  # estimates of the unshifted x_t; a trajectory-conditioned edit recomputes them
    )


def colour_offset(
    inv: InversionResult, offset: Sequence[float], start: float = 0.0, end: float = 1.0
) -> InversionResult:
    """Add a constant per-channel ``offset`` (C values, in map units) to the maps of the steps
    whose position ``i / N`` lies in ``[start, end)`` (0 = noisiest step, 1 = cleanest).

    A positive red offset makes the replayed image redder; a band late in the chain changes
    colour with little effect on structure.
    """
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"colour band [{start}, {end}) must satisfy 0 <= start < end <= 1")
    c = inv.zs.shape[2]
    if len(offset) != c:
        raise ValueError(f"offset has {len(offset)} values; the maps have {c} channels")
    n = inv.num_steps
    band = torch.tensor([start <= i / n < end for i in range(n)], device=inv.zs.device)
    off = torch.tensor(list(offset), dtype=inv.zs.dtype, device=inv.zs.device).view(1, 1, c, 1, 1)
    zs = inv.zs + band.view(n, 1, 1, 1, 1).to(inv.zs.dtype) * off
    return replace(inv, zs=zs)
