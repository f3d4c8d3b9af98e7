"""The DDPM noise schedule and the per-step Gaussian quantities, as tensor functions.

Notation follows ALGORITHMS.md: ``abar_t`` is the cumulative product of alphas; ``t`` and
``s = prev(t)`` are consecutive entries of the descending strided timestep list; at the last step
``abar_s`` is the final alpha (1.0, or ``abar_0`` when ``set_alpha_to_one`` is false).
Everything is built in float64 and only cast to the sample's dtype when applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Schedule:
    """``alphas_cumprod`` (float64, length T) and the cumulative alpha after the last step."""

    alphas_cumprod: Tensor
    final_alpha_cumprod: float = 1.0

    def __post_init__(self) -> None:
        a = self.alphas_cumprod
        if a.dtype != torch.float64 or a.ndim != 1:
            raise ValueError("alphas_cumprod must be a 1-D float64 tensor")
        if not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] <= a[:-1]).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1) and be non-increasing")
        if not 0.0 < self.final_alpha_cumprod <= 1.0:
            raise ValueError(f"final_alpha_cumprod={self.final_alpha_cumprod} not in (0, 1]")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_betas(cls, betas: Tensor, final_alpha_cumprod: float | None = 1.0) -> "Schedule":
        """``final_alpha_cumprod=None`` means ``abar_0`` (diffusers' ``set_alpha_to_one=False``)."""
        abar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        final = float(abar[0]) if final_alpha_cumprod is None else final_alpha_cumprod
        return cls(abar, final)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, final_alpha_cumprod: float | None = 1.0) -> "Schedule":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas, final_alpha_cumprod)

    # ------------------------------------------------------------------------- timesteps
    def timesteps(self, num_steps: int) -> list[int]:
        """Descending strided timesteps, "leading" spacing (diffusers' default):
        ``[(N-1)k, ..., k, 0]`` with ``k = T // N``."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps={num_steps} must be in [1, {T}]")
        stride = T // num_steps
        return [i * stride for i in range(num_steps - 1, -1, -1)]

    def abar(self, t: int) -> float:
        """``abar_t``; negative t (the step after the last) is the final alpha."""
        return self.final_alpha_cumprod if t < 0 else float(self.alphas_cumprod[t])

    @staticmethod
    def prev_timesteps(timesteps: list[int]) -> list[int]:
        """``s = prev(t)`` for every entry: the next entry, and -1 after the last."""
        return list(timesteps[1:]) + [-1]

    # --------------------------------------------------------------------- coefficients
    def step_coefficients(self, t: int, s: int, eta: float) -> "StepCoefficients":
        """Coefficients of the DDIM-family posterior p(x_s | x_t) for ``eta`` in [0, 1]:

        ``sigma^2 = eta^2 (1-abar_s)/(1-abar_t) (1 - abar_t/abar_s)``,
        ``mu = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps``;
        ``eta = 1`` is the DDPM posterior, ``eta = 0`` is DDIM.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must be in [0, 1]")
        a_t, a_s = self.abar(t), self.abar(s)
        var = eta**2 * (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
        var = max(var, 0.0)
        return StepCoefficients(
            sqrt_abar_t=math.sqrt(a_t),
            sqrt_one_minus_abar_t=math.sqrt(1.0 - a_t),
            sqrt_abar_s=math.sqrt(a_s),
            dir_coef=math.sqrt(max(1.0 - a_s - var, 0.0)),
            sigma=math.sqrt(var),
        )


@dataclass(frozen=True)
class StepCoefficients:
    sqrt_abar_t: float
    sqrt_one_minus_abar_t: float
    sqrt_abar_s: float
    dir_coef: float  # sqrt(1 - abar_s - sigma^2)
    sigma: float

    @property
    def noise_scale(self) -> float:
        """What a noise map is multiplied by: sigma, or 1 when sigma is 0 (the last step with
        final alpha 1 keeps the residual ``x0 - mu`` itself as its map)."""
        return self.sigma if self.sigma > 0.0 else 1.0


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Sample q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise.

    ``t``: (B,) integer timesteps; ``x0``, ``eps``: (B, C, H, W).
    """
    abar = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps


def predict_x0(schedule: Schedule, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
    """The model's x0 estimate ``P_t = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    if isinstance(t, int):
        a = schedule.abar(t)
        return (x_t - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
    abar = schedule.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype).view(-1, 1, 1, 1)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def posterior_mean(c: StepCoefficients, x_t: Tensor, eps: Tensor, clip_x0: bool = False) -> Tensor:
    """``mu_t(x_t, eps) = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps``.

    ``clip_x0`` clips ``x0_hat`` to [-1, 1] and uses the noise consistent with it (diffusers'
    ``clip_sample``); generation uses it, inversion and replay do not.
    """
    x0_hat = (x_t - c.sqrt_one_minus_abar_t * eps) / c.sqrt_abar_t
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps = (x_t - c.sqrt_abar_t * x0_hat) / c.sqrt_one_minus_abar_t
    return c.sqrt_abar_s * x0_hat + c.dir_coef * eps
