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
    gen = torch.Generator().manual_seed(seed)
    model = _model(denoiser, rectifier, x0)
    T = denoiser.schedule.num_train_timesteps
    gaps = []
    for t in torch.linspace(0, T - 1, num_t).long().tolist():
        eps = torch.randn(x0.shape, generator=gen)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        x_t = q_sample(denoiser.schedule, x0, tt, eps)
        gaps.append(M.posterior_gap(eps, model(x_t, t)))
    return torch.stack(gaps).mean(0)


@torch.no_grad()
def reconstruction_report(denoiser: Denoiser, x0: Tensor, num_steps: int,
                          rectifier: Optional[torch.nn.Module] = None, seed: int = 0,
                          batch_size: int = 8) -> dict[str, float]:
    """Means over ``x0`` (B, C, H, W) of L1, L2, SSIM, PSNR of the DDIM reconstruction at
    ``num_steps`` and of the posterior gap, for the backbone or the rectified model; plus the
    edit-friendly reconstruction's max error at min(N, 10) steps (exact for any model)."""
    rows: dict[str, list[Tensor]] = {k: [] for k in ("l1", "l2", "ssim", "psnr", "gap")}
    ef_max = 0.0
    for start in range(0, x0.shape[0], batch_size):
        xb = x0[start:start + batch_size]
        model = _model(denoiser, rectifier, xb)
        rec = ddim_sample(model, denoiser.schedule,
                          ddim_invert(model, denoiser.schedule, xb, num_steps), num_steps).clamp(-1, 1)
        for name in ("l1", "l2", "ssim", "psnr"):
            rows[name].append(getattr(M, name)(xb, rec))
        rows["gap"].append(posterior_gap(denoiser, rectifier, xb, seed=seed))
        inv = invert(model, denoiser.schedule, xb, min(num_steps, 10),
                     generator=torch.Generator().manual_seed(seed))
        ef_max = max(ef_max, (replay(model, denoiser.schedule, inv) - xb).abs().max().item())
    report = {k: float(torch.cat(v).mean()) for k, v in rows.items()}
    report["edit_friendly_max_error"] = ef_max
    return report


# ------------------------------------------------------------------ the evaluate stage's tables
MODELS = ("backbone", "rectifier")
INVERSIONS = ("ddim", "edit_friendly")


@torch.no_grad()
def reconstruction_table(denoiser: Denoiser, x0: Tensor, steps: Sequence[int],
                         rectifier: Optional[torch.nn.Module] = None, eta: float = 1.0,
                         seed: int = 0, batch_size: int = 8,
                         with_lpips: bool = False) -> list[dict[str, float]]:
    """The paper's Table 1 comparisons at every ``N`` in ``steps``: rows of
    ``{steps, model, inversion, l1, l2, ssim, psnr, max_error[, lpips]}`` (means over ``x0``)
    for model in backbone / rectifier (when given) and inversion in DDIM (invert to x_T, sample
    back) / edit-friendly (maps with image i's noise seeded ``seed + i``, replayed)."""
    models = {"backbone": None, **({"rectifier": rectifier} if rectifier is not None else {})}
    rows = []
    for n in steps:
        for name, rect in models.items():
            per: dict[str, dict[str, list[Tensor]]] = {inv: {} for inv in INVERSIONS}
            for start in range(0, x0.shape[0], batch_size):
                xb = x0[start:start + batch_size]
                model = _model(denoiser, rect, xb)
                ddim = ddim_sample(model, denoiser.schedule,
                                   ddim_invert(model, denoiser.schedule, xb, n), n)
                seeds = range(seed + start, seed + start + xb.shape[0])
                inv = invert(model, denoiser.schedule, xb, n, eta=eta,
                             noise=per_image_noise(list(seeds), n, xb.shape[1:]))
                ef = replay(model, denoiser.schedule, inv)
                for kind, rec in (("ddim", ddim), ("edit_friendly", ef)):
                    values = M.reconstruction_metrics(xb, rec.clamp(-1, 1), with_lpips=with_lpips)
                    values["max_error"] = (rec - xb).abs().flatten(1).amax(1)
                    for k, v in values.items():
                        per[kind].setdefault(k, []).append(v.float().cpu())
            for kind in INVERSIONS:
                row: dict = {"steps": int(n), "model": name, "inversion": kind}
                for k, v in per[kind].items():
                    t = torch.cat(v)
                    row[k] = float(t.amax() if k == "max_error" else t.mean())
                rows.append(row)
    return rows


def posterior_gaps(denoiser: Denoiser, x0: Tensor, rectifier: Optional[torch.nn.Module] = None,
                   seed: int = 0, batch_size: int = 8) -> dict[str, float]:
    """Mean posterior gap ``||eps - eps_model||^2`` (:func:`posterior_gap`) per model."""
    out = {}
    for name, rect in (("backbone", None), ("rectifier", rectifier)):
        if name == "rectifier" and rect is None:
            continue
        gaps = [posterior_gap(denoiser, rect, x0[s:s + batch_size], seed=seed)
                for s in range(0, x0.shape[0], batch_size)]
        out[name] = float(torch.cat(gaps).mean())
    return out
