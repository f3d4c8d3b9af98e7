"""Invert + edit one batch: the one place that composes inversion and rectifiers.

An edit of an image (ALGORITHMS.md sections 1 and 4): invert it once with the backbone
(edit-friendly maps, N evaluations), then replay its maps from ``skip`` through the backbone
modulated by the attribute's rectifier conditioned on the source image (N - skip evaluations
each). With no rectifier the replay is the exact reconstruction. Every front end (CLI, Ray Data
batch job, evaluation) calls :class:`Editor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from hfedit.backbone import Denoiser
from hfedit.config import InversionConfig
from hfedit.inversion import InversionResult, invert, per_image_noise, replay

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
        return ModulatedDenoiser(self.denoiser, rect).conditioned(x0)

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
