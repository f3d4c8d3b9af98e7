"""Reconstruction reports: backbone vs rectifier, edit-friendly vs DDIM inversion.

With edit-friendly maps every model reconstructs exactly by construction, so fidelity of the
*model* is measured the way the paper's Table 1 does: deterministic DDIM inversion to x_T and
DDIM sampling back, at N steps, with the plain backbone or the backbone rectified by ``R``
conditioned on the source; plus the posterior gap ``||eps - eps_model(x_t, t)||^2`` averaged
over ``t`` on held-out images.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from hfedit import metrics as M
from hfedit.backbone import Denoiser
from hfedit.inversion import ddim_invert, ddim_sample, invert, per_image_noise, replay
from hfedit.schedule import q_sample


def _model(denoiser: Denoiser, rectifier: Optional[torch.nn.Module], x0: Tensor):
    if rectifier is None:
        return denoiser
    from hfedit.rectifier import ModulatedDenoiser

    return ModulatedDenoiser(denoiser, rectifier).conditioned(x0)


@torch.no_grad()
def posterior_gap(denoiser: Denoiser, rectifier: Optional[torch.nn.Module], x0: Tensor,
                  num_t: int = 20, seed: int = 0) -> Tensor:
    """Per-image mean over ``num_t`` evenly spaced t of ``mean((eps - eps_model(x_t, t))^2)``."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    x0 = x0.to(denoiser.device)
    model = _model(denoiser, rectifier, x0)
    T = denoiser.schedule.num_train_timesteps
    gaps = []
    for t in torch.linspace(0, T - 1, num_t).long().tolist():
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        x_t = q_sample(denoiser.schedule, x0, tt, eps)
        gaps.append(M.posterior_gap(eps, model(x_t, t)))
    return torch.stack(gaps).mean(0)


@torch.no_grad()
def reconstruction_report(denoiser: Denoiser, x0: Tensor, num_steps: int,
                          rectifier: Optional[torch.nn.Module] = None, seed: int = 0,
                          batch_size: int = 8, gap_timesteps: int = 20) -> dict[str, float]:
    """Means over ``x0`` (B, C, H, W) of L1, L2, SSIM, PSNR of the DDIM reconstruction at
    ``num_steps`` and of the posterior gap, for the backbone or the rectified model; plus the
    edit-friendly reconstruction's max error at the same N (exact for any model)."""
    both = reconstruct(denoiser, x0, num_steps, rectifier, seed=seed, batch_size=batch_size)
    report = {k: both["ddim"][k] for k in ("l1", "l2", "ssim", "psnr")}
    report["gap"] = mean_posterior_gap(denoiser, x0, rectifier, seed, batch_size, gap_timesteps)
    report["edit_friendly_max_error"] = both["edit_friendly"]["max_error"]
    return report

# ------------------------------------------------------------------ the evaluate stage's tables
INVERSIONS = ("ddim", "edit_friendly")


@torch.no_grad()
def reconstruct(denoiser: Denoiser, x0: Tensor, n: int, rectifier: Optional[torch.nn.Module] = None,
                eta: float = 1.0, seed: int = 0, batch_size: int = 8,
                with_lpips: bool = False) -> dict[str, dict[str, float]]:
    """``{inversion: {metric: value}}`` for one model at ``n`` steps: DDIM (invert to x_T,
    sample back) and edit-friendly (maps with image i's noise seeded ``seed + i``, replayed);
    metrics are means over ``x0`` of L1, L2, SSIM, PSNR (LPIPS) and the max error."""
    per: dict[str, dict[str, list[Tensor]]] = {inv: {} for inv in INVERSIONS}
    for start in range(0, x0.shape[0], batch_size):
        xb = x0[start:start + batch_size].to(denoiser.device)  # one move per batch
        model = _model(denoiser, rectifier, xb)
        ddim = ddim_sample(model, denoiser.schedule, ddim_invert(model, denoiser.schedule, xb, n), n)
        seeds = list(range(seed + start, seed + start + xb.shape[0]))
        inv = invert(model, denoiser.schedule, xb, n, eta=eta,
                     noise=per_image_noise(seeds, n, xb.shape[1:]))
        for kind, rec in (("ddim", ddim), ("edit_friendly", replay(model, denoiser.schedule, inv))):
            values = M.reconstruction_metrics(xb, rec.clamp(-1, 1), with_lpips=with_lpips)
            values["max_error"] = (rec - xb).abs().flatten(1).amax(1)
            for k, v in values.items():
                per[kind].setdefault(k, []).append(v.float().cpu())
    return {kind: {k: float(torch.cat(v).amax() if k == "max_error" else torch.cat(v).mean())
                   for k, v in per[kind].items()} for kind in INVERSIONS}


def reconstruction_table(denoiser: Denoiser, x0: Tensor, steps: Sequence[int],
                         rectifier: Optional[torch.nn.Module] = None, eta: float = 1.0,
                         seed: int = 0, batch_size: int = 8,
                         with_lpips: bool = False) -> list[dict[str, float]]:
    """The paper's Table 1 comparisons at every ``N`` in ``steps``: rows of
    ``{steps, model, inversion, l1, l2, ssim, psnr, max_error[, lpips]}`` (:func:`reconstruct`)
    for model in backbone / rectifier (when given) and inversion in DDIM / edit-friendly."""
    models = {"backbone": None, **({"rectifier": rectifier} if rectifier is not None else {})}
    rows = []
    for n in steps:
        for name, rect in models.items():
            both = reconstruct(denoiser, x0, n, rect, eta, seed, batch_size, with_lpips)
            rows += [{"steps": int(n), "model": name, "inversion": kind, **both[kind]}
                     for kind in INVERSIONS]
    return rows


def mean_posterior_gap(denoiser: Denoiser, x0: Tensor, rectifier: Optional[torch.nn.Module] = None,
                       seed: int = 0, batch_size: int = 8, num_t: int = 20) -> float:
    """:func:`posterior_gap` at ``num_t`` timesteps averaged over ``x0``, in batches."""
    return float(torch.cat([posterior_gap(denoiser, rectifier, x0[i:i + batch_size], num_t, seed)
                            .cpu() for i in range(0, x0.shape[0], batch_size)]).mean())


def posterior_gaps(denoiser: Denoiser, x0: Tensor, rectifier: Optional[torch.nn.Module] = None,
                   seed: int = 0, batch_size: int = 8, num_t: int = 20) -> dict[str, float]:
    """:func:`mean_posterior_gap` of the backbone and (when given) the rectified model."""
    models = {"backbone": None, **({"rectifier": rectifier} if rectifier is not None else {})}
    return {name: mean_posterior_gap(denoiser, x0, rect, seed, batch_size, num_t)
            for name, rect in models.items()}
