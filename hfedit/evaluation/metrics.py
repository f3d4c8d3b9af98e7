"""Image metrics of the paper's tables (ALGORITHMS.md section 5).

Every metric has the signature ``(reference, result) -> Tensor[B]`` (one value per image; the
caller averages). Images are (B, 3, H, W) in [-1, 1], the library's convention; each metric maps
them to [0, 1] with ``x01 = (x + 1) / 2`` (no clipping, so everything stays differentiable) and
computes there, as the paper's Table 1 does:

- ``l1``   mean |ref01 - res01|                   (lower is better)
- ``l2``   mean (ref01 - res01)^2, the MSE         (lower is better)
- ``psnr`` 10 log10(1 / MSE), data range 1, capped at 100 dB (MSE floored at 1e-10), so identical
           images score 100, not inf, and means over a dataset stay finite
- ``ssim`` Gaussian-window SSIM (Wang et al. 2004; 11x11 window, sigma 1.5, K1 0.01, K2 0.03,
           population covariance), averaged over the valid window positions and the channels;
           equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
           use_sample_covariance=False, data_range=1, channel_axis=...)``
- ``lpips`` only when its weights are on disk (:func:`lpips_available`); never downloads.

``squared_difference(a, b)`` is the mean squared difference per sample on the values as given
(no [0, 1] mapping): of the true and the predicted noise it is the paper's ||Delta e||^2 at one t
(:func:`hfedit.evaluation.reconstruction.noise_mse`), of two posterior means PDAE's gap at one
step (:func:`hfedit.evaluation.reconstruction.posterior_mean_gap`).
Identity similarity lives in :mod:`hfedit.evaluation.identity`; the CLIP directional similarity is
``DirectionalClipLoss.clip_directional_similarity`` in :mod:`hfedit.models.clip`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PSNR_MAX_DB = 100.0
SSIM_WIN, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _check_pair(reference: torch.Tensor, result: torch.Tensor) -> None:
    if reference.shape != result.shape or reference.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) tensors of the same shape, got {tuple(reference.shape)} "
            f"and {tuple(result.shape)}"
        )


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: (x + 1) / 2, not clipped."""
    return (x + 1) / 2


def l1(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Mean absolute error on [0, 1] images, per image: (B, C, H, W) x 2 -> (B,)."""
    _check_pair(reference, result)
    return (to_unit_range(reference) - to_unit_range(result)).abs().flatten(1).mean(1)


def l2(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Mean squared error on [0, 1] images, per image: (B, C, H, W) x 2 -> (B,)."""
    _check_pair(reference, result)
    return (to_unit_range(reference) - to_unit_range(result)).square().flatten(1).mean(1)


def psnr(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """PSNR in dB on [0, 1] images (data range 1): 10 log10(1 / max(MSE, 1e-10)), per image.

    Capped at 100 dB: identical images give exactly 100.0 (not inf).
    """
    mse = l2(reference, result).clamp_min(10 ** (-PSNR_MAX_DB / 10))
    return -10.0 * torch.log10(mse)


@lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, float64, (size,); as scipy.ndimage truncates it."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def _blur_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter without padding: (B, C, H, W) -> (B, C, H-k+1, W-k+1).

    The valid part is what skimage keeps: it filters with reflect padding and then crops
    (k - 1) / 2 pixels on each side, where the padding never reaches.
    """
    c, k = x.shape[1], taps.numel()
    w = taps.to(x)
    x = F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Gaussian-window SSIM on [0, 1] images, per image: (B, C, H, W) x 2 -> (B,).

    With mu, sigma^2, sigma_xy the Gaussian-weighted local means, variances and covariance
    (11x11 window, sigma 1.5) and C1 = (0.01)^2, C2 = (0.03)^2 (data range 1):

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2)
                     / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

    averaged over the window positions fully inside the image, then over channels.
    Differentiable; needs H, W >= 11.
    """
    _check_pair(reference, result)
    h, w = reference.shape[-2:]
    if min(h, w) < SSIM_WIN:
        raise ValueError(f"ssim needs images of at least {SSIM_WIN}x{SSIM_WIN}, got {h}x{w}")
    x, y = to_unit_range(reference), to_unit_range(result)
    c = x.shape[1]
    taps = _gaussian_1d(SSIM_WIN, SSIM_SIGMA)
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), taps)  # (B, 5C, h', w')
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)  # each (B, C, h', w')
    var_x, var_y = e_xx - mu_x.square(), e_yy - mu_y.square()
    cov = e_xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(1)


def squared_difference(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Mean over (C, H, W) of (reference - result)^2 on the values as given, per sample:
    (B, C, H, W) x 2 -> (B,). Of the true noise and the predicted one: the paper's
    ||Delta e||^2 at one t; the caller averages over timesteps and samples."""
    _check_pair(reference, result)
    return (reference - result).square().flatten(1).mean(1)


# ------------------------------------------------------------------------------------- LPIPS
def _alexnet_weights_path() -> str:
    """Where torchvision (hence the lpips package) looks for the AlexNet backbone weights."""
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def lpips_available() -> tuple[bool, str]:
    """Whether LPIPS (AlexNet, v0.1) can be computed without any download, and why not.

    Needs the ``lpips`` package (its wheel ships the linear-layer weights) and torchvision's
    AlexNet ImageNet weights already in the torch hub cache. Never downloads.
    """
    path = _alexnet_weights_path()
    if not os.path.isfile(path):
        return False, (
            f"LPIPS weights not found at {path}; set TORCH_HOME to a folder whose "
            f"hub/checkpoints/ holds {os.path.basename(path)} (torchvision's AlexNet) "
            f"to enable it"
        )
    if importlib.util.find_spec("lpips") is None:
        return False, (
            f"LPIPS backbone weights found at {path}, but the 'lpips' package (which ships the "
            f"LPIPS linear-layer weights) is not installed; pip install lpips to enable it"
        )
    return True, f"LPIPS (AlexNet, v0.1) with backbone weights {path}"


@lru_cache(maxsize=1)
def _lpips_model() -> torch.nn.Module:
    import lpips as lpips_pkg

    return lpips_pkg.LPIPS(net="alex", pretrained=True, verbose=False).eval().requires_grad_(False)


def lpips(reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """LPIPS distance (AlexNet, v0.1) per image, (B,); inputs in [-1, 1] as LPIPS expects.

    Raises RuntimeError with :func:`lpips_available`'s reason when the weights are not on disk.
    """
    _check_pair(reference, result)
    ok, reason = lpips_available()
    if not ok:
        raise RuntimeError(reason)
    model = _lpips_model().to(reference.device)
    return model(reference, result).flatten()


RECONSTRUCTION_METRICS: dict[str, Metric] = {"l1": l1, "l2": l2, "psnr": psnr, "ssim": ssim}


def reconstruction_metrics(
    reference: torch.Tensor, result: torch.Tensor, with_lpips: bool | None = None
) -> dict[str, torch.Tensor]:
    """Table 1's metrics at once: {name: (B,)}. LPIPS is added when available (or when
    ``with_lpips`` is True, which then raises if it is not); a NaN-free dict otherwise."""
    out = {name: fn(reference, result) for name, fn in RECONSTRUCTION_METRICS.items()}
    if with_lpips or (with_lpips is None and lpips_available()[0]):
        out["lpips"] = lpips(reference, result)
    return out


def mean_finite(values: torch.Tensor) -> float:
    """Mean over the finite entries (identity similarity is NaN where no face was found)."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan
