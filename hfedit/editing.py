"""Invert + edit one batch: the one place that composes inversion and rectifiers.

An edit of an image (ALGORITHMS.md sections 1 and 4): invert it once with the backbone
(edit-friendly maps, N evaluations), then replay its maps from ``skip`` through the backbone
modulated by the attribute's rectifier conditioned on the source image (N - skip evaluations
each). With no rectifier the replay is the exact reconstruction. Every front end (CLI, Ray Data
batch job, evaluation) calls :class:`Editor`; :func:`load_editor` builds one from the pipeline's
folders (``models/backbone``, ``models/edits/<attribute>/``, ``models/rectifier``).

Also SDEdit-style image-to-image translation with a rectifier (the paper's "Image to Image
Translation"): :func:`sdedit` / :meth:`Editor.translate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from hfedit.backbone import Denoiser
from hfedit.config import InversionConfig
from hfedit.inversion import InversionResult, invert, per_image_noise, replay
from hfedit.schedule import Schedule, posterior_mean, q_sample

RECONSTRUCTION = "reconstruction"


@dataclass
class EditBatch:
    """``outputs[name]``: (B, C, H, W) in [-1, 1] per requested name (``reconstruction`` or an
    attribute); ``evaluations``: denoiser calls spent per name (inversion under "inversion")."""

    inversion: InversionResult
    outputs: dict[str, Tensor] = field(default_factory=dict)
    evaluations: dict[str, int] = field(default_factory=dict)


class Editor:
    """Loads nothing: takes a frozen backbone and ready rectifiers (one per attribute)."""

    def __init__(
        self,
        denoiser: Denoiser,
        inversion: InversionConfig,
        rectifiers: Optional[Mapping[str, torch.nn.Module]] = None,
        reconstruction_rectifier: Optional[torch.nn.Module] = None,
    ) -> None:
        self.denoiser = denoiser
        self.cfg = inversion
        self.rectifiers = dict(rectifiers or {})
        self.reconstruction_rectifier = reconstruction_rectifier

    @property
    def attributes(self) -> list[str]:
        return sorted(self.rectifiers)

    def invert(self, x0: Tensor, seeds: Sequence[int]) -> InversionResult:
        """Maps of ``x0`` (B, C, H, W); image b's noise comes from ``seeds[b]`` alone."""
        if len(seeds) != x0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x0.shape[0]} images")
        noise = per_image_noise(seeds, self.cfg.num_steps, x0.shape[1:])
        return invert(self.denoiser, self.denoiser.schedule, x0, self.cfg.num_steps,
                      eta=self.cfg.eta, noise=noise)

    def _replayer(self, name: str, x0: Tensor):
        from hfedit.rectifier import ModulatedDenoiser

        rect = self.reconstruction_rectifier if name == RECONSTRUCTION else self.rectifiers.get(name)
        if name != RECONSTRUCTION and rect is None:
            raise KeyError(f"no rectifier for attribute '{name}' (have: {self.attributes})")
        if rect is None:
            return self.denoiser
        return ModulatedDenoiser(self.denoiser, rect, rect.cfg.modulation).conditioned(x0)

    @torch.no_grad()
    def edit(self, x0: Tensor, seeds: Sequence[int], names: Sequence[str] = (RECONSTRUCTION,),
             inversion: Optional[InversionResult] = None) -> EditBatch:
        """Invert ``x0`` once (unless ``inversion`` is given) and replay it for every name."""
        inv = inversion if inversion is not None else self.invert(x0, seeds)
        batch = EditBatch(inv, evaluations={"inversion": 0 if inversion is not None else inv.num_steps})
        for name in names:
            fn = self._replayer(name, x0)
            batch.outputs[name] = replay(fn, self.denoiser.schedule, inv, skip=self.cfg.skip)
            batch.evaluations[name] = inv.num_steps - self.cfg.skip
        return batch

    @torch.no_grad()
    def translate(self, x0: Tensor, seeds: Sequence[int], strength: float,
                  name: str = RECONSTRUCTION, num_steps: Optional[int] = None) -> Tensor:
        """SDEdit through the model of ``name`` (the reconstruction rectifier by default, the
        paper's setting; the plain backbone when there is none): see :func:`sdedit`."""
        if len(seeds) != x0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x0.shape[0]} images")
        n = num_steps or self.cfg.num_steps
        noise = per_image_noise(seeds, n + 1, x0.shape[1:])  # (N + 1, B, C, H, W)
        return sdedit(self._replayer(name, x0), self.denoiser.schedule, x0, strength, n,
                      eta=self.cfg.eta, noise=noise)


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


# -------------------------------------------------------------------------------- loading
EDIT_RECTIFIER_FILE = "rectifier.json"  # what marks a folder of models/edits as an attribute


def available_edits(edits_dir) -> list[str]:
    """Attribute names with a complete edit rectifier under ``edits_dir`` (sorted)."""
    from pathlib import Path

    from hfedit.checkpoint import RECTIFIER, has_checkpoint

    root = Path(edits_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and has_checkpoint(p, RECTIFIER))


def load_edit_rectifiers(edits_dir, unet: torch.nn.Module,
                         attributes: Optional[Sequence[str]] = None,
                         device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """``{attribute: rectifier}`` from ``edits_dir/<attribute>/`` (written by stage
    ``train_edits``); all of them when ``attributes`` is None. Raises KeyError naming the
    attributes that exist when one asked for is missing."""
    from pathlib import Path

    from hfedit.checkpoint import load_rectifier

    have = available_edits(edits_dir)
    wanted = list(have if attributes is None else attributes)
    missing = [a for a in wanted if a not in have]
    if missing:
        raise KeyError(f"no edit rectifier for attribute(s) {missing} in {edits_dir} "
                       f"(have: {have}); run the train_edits stage or check edits.attributes")
    out = {}
    for name in wanted:
        rect, _ = load_rectifier(Path(edits_dir) / name, unet, device=str(device))
        out[name] = rect
    return out


def load_editor(backbone, inversion: InversionConfig, edits_dir=None,
                attributes: Optional[Sequence[str]] = None, reconstruction_dir=None,
                device: str | torch.device = "cpu") -> Editor:
    """An :class:`Editor` over the backbone at ``backbone`` (folder or hub id), the edit
    rectifiers of ``attributes`` (all found when None) under ``edits_dir``, and optionally the
    reconstruction rectifier in ``reconstruction_dir`` (for :meth:`Editor.translate`)."""
    from hfedit.backbone import load_backbone
    from hfedit.checkpoint import load_rectifier

    denoiser = load_backbone(backbone, device=device)
    rectifiers = ({} if edits_dir is None else
                  load_edit_rectifiers(edits_dir, denoiser.unet, attributes, device))
    recon = None
    if reconstruction_dir is not None:
        recon, _ = load_rectifier(reconstruction_dir, denoiser.unet, device=str(device))
    return Editor(denoiser, inversion, rectifiers, recon)
