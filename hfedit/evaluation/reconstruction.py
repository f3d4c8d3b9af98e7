"""Reconstruction reports: backbone vs rectifier, edit-friendly vs DDIM inversion.

With edit-friendly maps every model reconstructs exactly by construction, so fidelity of the
*model* is measured the way the paper's Table 1 does: deterministic DDIM inversion to x_T and
DDIM sampling back, at N steps, with the plain backbone or the backbone rectified by ``R``
conditioned on the source; plus two gaps on held-out images:

* ``gap`` (:func:`noise_mse`): the noise gap ``||eps - eps_model(x_t, t)||^2`` averaged over
  evenly spaced ``t`` (every t weighted alike);
* ``posterior_mean_gap`` (:func:`posterior_mean_gap`): PDAE's gap between the true posterior
  mean ``mu~(x_t, x0)`` of ``q(x_s | x_t, x0)`` and the model's ``mu_theta(x_t)``, along the
  N-step chain (``s = prev(t)``), averaged over its N steps. With ``eps`` parametrisation
  ``mu~ - mu_theta = c_t (eps_model - eps)`` with ``c_t = sqrt(abar_s) sqrt(1-abar_t) /
  sqrt(abar_t) - sqrt(1 - abar_s)``: the noise gap weighted by ``c_t^2``, which is largest at
  large t and grows with the stride T/N (N = 50: 0.006 at t = 20, 0.16 at t = 980, mean 0.057;
  N = 1000: mean 1.5e-4). The paper's Table 1 column "average posterior mean gap ||Delta e||^2" names this one
  (after PDAE) while its symbol is the noise gap's; both are reported.

Every table reports mean and standard deviation over the images and their count.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from hfedit.evaluation import metrics as M
from hfedit.models.backbone import Denoiser
from hfedit.diffusion.inversion import ddim_invert, ddim_sample, invert, per_image_noise, replay
from hfedit.diffusion.schedule import Schedule, posterior_mean, q_sample


def _model(denoiser: Denoiser, rectifier: Optional[torch.nn.Module], x0: Tensor):
    if rectifier is None:
        return denoiser
    from hfedit.models.rectifier import ModulatedDenoiser

    return ModulatedDenoiser(denoiser, rectifier).conditioned(x0)


@torch.no_grad()
def noise_mse(denoiser: Denoiser, x0: Tensor, rectifier: Optional[torch.nn.Module] = None,
              seed: int = 0, batch_size: int = 8, num_t: int = 20) -> Tensor:
    """The noise gap of the backbone (``rectifier`` None) or the rectified model, per image of
    ``x0`` (N, C, H, W): (N,) on the CPU.

    ``mean_t mean_{C,H,W} (eps - eps_model(x_t, t))^2`` over ``num_t`` evenly spaced t in
    [0, T-1] (every t weighted alike), ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. Runs
    in batches of ``batch_size``; each batch draws its ``eps`` from a CPU generator seeded
    ``seed`` (the same draws on every device; an image's draw depends on its place in its batch).
    """
    return torch.cat([_noise_mse_batch(denoiser, rectifier, x0[i:i + batch_size], num_t, seed)
                      for i in range(0, x0.shape[0], batch_size)])


def _noise_mse_batch(denoiser: Denoiser, rectifier: Optional[torch.nn.Module], x0: Tensor,
                     num_t: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    x0 = x0.to(denoiser.device)
    model = _model(denoiser, rectifier, x0)
    T = denoiser.schedule.num_train_timesteps
    mse = []
    for t in torch.linspace(0, T - 1, num_t).long().tolist():
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        x_t = q_sample(denoiser.schedule, x0, tt, eps)
        mse.append(M.squared_difference(eps, model(x_t, t)))
    return torch.stack(mse).mean(0).cpu()


@torch.no_grad()
def posterior_mean_gap(model, schedule: Schedule, x0: Tensor, num_steps: int,
                       seeds: Sequence[int]) -> Tensor:
    """PDAE's posterior-mean gap of ``model`` (any ``eps = model(x_t, t)``) along the N-step
    chain, per image: (B,).

    For every strided ``t`` with ``s = prev(t)``: ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``
    (image b's ``eps`` drawn from ``seeds[b]``: independent of batching), the true posterior
    mean of ``q(x_s | x_t, x0)`` is :func:`hfedit.diffusion.schedule.posterior_mean` with the true
    ``eps`` (its x0 estimate is x0 itself) and DDPM's variance (eta = 1); the model's uses
    ``model(x_t, t)``. The gap is the mean over (C, H, W) of their squared difference, averaged
    over the N steps. 0 exactly when the model predicts the true noise.
    """
    timesteps = schedule.timesteps(num_steps)
    noise = per_image_noise(seeds, num_steps, x0.shape[1:]).to(device=x0.device, dtype=x0.dtype)
    gaps = []
    for i, (t, s) in enumerate(zip(timesteps, Schedule.prev_timesteps(timesteps))):
        coef = schedule.step_coefficients(t, s, 1.0)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        x_t = q_sample(schedule, x0, tt, noise[i])
        mu_true = posterior_mean(coef, x_t, noise[i])
        gaps.append(M.squared_difference(mu_true, posterior_mean(coef, x_t, model(x_t, t))))
    return torch.stack(gaps).mean(0)


def mean_std(values: Tensor) -> dict[str, float]:
    """``{"mean", "std", "images"}`` of per-image values (std: sample std, 0 for one image);
    NaN entries (no face found, ...) are left out of all three."""
    v = values[torch.isfinite(values)].double()
    n = int(v.numel())
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "images": 0}
    return {"mean": float(v.mean()), "std": float(v.std()) if n > 1 else 0.0, "images": n}


@torch.no_grad()
def posterior_mean_gaps(denoiser: Denoiser, x0: Tensor, steps: Sequence[int],
                        rectifier: Optional[torch.nn.Module] = None, seed: int = 0,
                        batch_size: int = 8) -> list[dict[str, float]]:
    """Rows ``{steps, model, mean, std, images}`` of :func:`posterior_mean_gap` at every N in
    ``steps`` for the backbone and (when given) the rectified model; image i seeded ``seed + i``."""
    models = {"backbone": None, **({"rectifier": rectifier} if rectifier is not None else {})}
    rows = []
    for n in steps:
        for name, rect in models.items():
            per = []
            for start in range(0, x0.shape[0], batch_size):
                xb = x0[start:start + batch_size].to(denoiser.device)
                seeds = range(seed + start, seed + start + xb.shape[0])
                per.append(posterior_mean_gap(_model(denoiser, rect, xb), denoiser.schedule, xb,
                                              int(n), list(seeds)).float().cpu())
            rows.append({"steps": int(n), "model": name, **mean_std(torch.cat(per))})
    return rows


@torch.no_grad()
def reconstruction_report(denoiser: Denoiser, x0: Tensor, num_steps: int,
                          rectifier: Optional[torch.nn.Module] = None, seed: int = 0,
                          batch_size: int = 8, gap_timesteps: int = 20) -> dict[str, float]:
    """Means over ``x0`` (B, C, H, W) of L1, L2, SSIM, PSNR of the DDIM reconstruction at
    ``num_steps`` and of the noise gap (``gap``: :func:`noise_mse`), for the backbone or the
    rectified model; plus the edit-friendly reconstruction's max error at the same N (exact for
    any model)."""
    both = reconstruct(denoiser, x0, num_steps, rectifier, seed=seed, batch_size=batch_size)
    report = {k: both["ddim"][k] for k in ("l1", "l2", "ssim", "psnr")}
    report["gap"] = float(noise_mse(denoiser, x0, rectifier, seed, batch_size,
                                    gap_timesteps).mean())
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
    metrics are means over ``x0`` of L1, L2, SSIM, PSNR (LPIPS), each with ``<metric>_std``
    (sample standard deviation over the images), the max error and ``images``."""
    per: dict[str, dict[str, list[Tensor]]] = {inv: {} for inv in INVERSIONS}
    for start in range(0, x0.shape[0], batch_size):
        xb = x0[start:start + batch_size].to(denoiser.device)  # one move per batch
        model = _model(denoiser, rectifier, xb)
        x_T = ddim_invert(model, denoiser.schedule, xb, n).xts[0]
        ddim = ddim_sample(model, denoiser.schedule, x_T, n)
        seeds = list(range(seed + start, seed + start + xb.shape[0]))
        inv = invert(model, denoiser.schedule, xb, n, eta=eta,
                     noise=per_image_noise(seeds, n, xb.shape[1:]))
        for kind, rec in (("ddim", ddim), ("edit_friendly", replay(model, denoiser.schedule, inv))):
            values = M.reconstruction_metrics(xb, rec.clamp(-1, 1), with_lpips=with_lpips)
            values["max_error"] = (rec - xb).abs().flatten(1).amax(1)
            for k, v in values.items():
                per[kind].setdefault(k, []).append(v.float().cpu())
    out: dict[str, dict[str, float]] = {}
    for kind in INVERSIONS:
        out[kind] = {}
        for k, v in per[kind].items():
            if k == "max_error":
                out[kind][k] = float(torch.cat(v).amax())
                continue
            stats = mean_std(torch.cat(v))
            out[kind][k], out[kind][f"{k}_std"] = stats["mean"], stats["std"]
        out[kind]["images"] = int(x0.shape[0])
    return out


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
