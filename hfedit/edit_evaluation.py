"""How good an edit is, on held-out images: edit strength and fidelity to the source.

For source images ``x0`` and their edits ``x_edit`` (by :class:`hfedit.editing.Editor`: invert
once, replay through the attribute's rectifier), per image:

- ``clip_direction``: cos(E_I(x_edit) - E_I(x0), E_T(target) - E_T(source)), the directional CLIP
  similarity (edit strength; higher = more along the text direction; 0 = no movement);
- ``l1``, ``ssim``, ``psnr``: fidelity to the source on [0, 1] images (:mod:`hfedit.metrics`);
- ``identity``: dlib face-descriptor cosine similarity (:mod:`hfedit.identity`), NaN where no
  face of at least ``min_face_px`` could be scored (with the reason).

The paper's claim (its Fig. 6 and Table 2): score-matching training keeps more of the source
(fidelity, identity) at equal or better edit strength than Markovian training.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from hfedit import metrics as M
from hfedit.clip_loss import DirectionalClipLoss

FIDELITY = ("l1", "ssim", "psnr")


@dataclass
class EditEvaluation:
    """``edited``: (B, C, H, W) in [-1, 1]; ``per_image``: name -> (B,) float tensors;
    ``identity_reasons``: why each image's identity is NaN (None where scored)."""

    edited: Tensor
    per_image: dict[str, Tensor] = field(default_factory=dict)
    identity_reasons: list[Optional[str]] = field(default_factory=list)
    identity_note: str = ""

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {k: float(v.mean()) for k, v in self.per_image.items()
                                  if k != "identity"}
        ident = self.per_image.get("identity")
        if ident is not None:
            scored = int(torch.isfinite(ident).sum())
            out["identity"] = M.mean_finite(ident) if scored else None  # null in JSON
            out["identity_scored"] = scored
        reasons = Counter(r for r in self.identity_reasons if r)
        if reasons:
            out["identity_not_scored"] = dict(reasons)
        if self.identity_note:
            out["identity_note"] = self.identity_note
        out["images"] = int(self.edited.shape[0])
        return out


@torch.no_grad()
def evaluate_edit(editor, attribute: str, x0: Tensor, seeds: Sequence[int],
                  direction: DirectionalClipLoss, identity=None, batch_size: int = 8,
                  identity_note: str = "", condition=None) -> EditEvaluation:
    """Edit ``x0`` (N, C, H, W) with ``editor`` for ``attribute`` (image i seeded by
    ``seeds[i]``) in batches and score every edit against its source.

    ``identity``: an :class:`hfedit.identity.IdentityScorer` (or None: not scored, with
    ``identity_note`` saying why). ``condition``: the rectifier's conditioning
    (:class:`hfedit.config.Conditioning`; None = the editor's config)."""
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {x0.shape[0]} images")
    device = editor.denoiser.device
    x0 = x0.cpu()
    edited, clip_direction = [], []
    for i in range(0, x0.shape[0], batch_size):
        xb = x0[i:i + batch_size].to(device)  # one move per batch; results come back to the CPU
        batch = editor.edit(xb, list(seeds[i:i + batch_size]), names=(attribute,),
                            condition=condition)
        out = batch.outputs[attribute].clamp(-1, 1)
        clip_direction.append(direction.clip_directional_similarity(xb, out).float().cpu())
        edited.append(out.float().cpu())
    x_edit = torch.cat(edited)
    per: dict[str, Tensor] = {"clip_direction": torch.cat(clip_direction)}
    for name in FIDELITY:
        per[name] = getattr(M, name)(x0, x_edit).float().cpu()
    reasons: list[Optional[str]] = [None] * x0.shape[0]
    if identity is not None:
        scores = identity.score(x0, x_edit)
        per["identity"] = scores.similarity.float().cpu()
        reasons = scores.reasons
    else:
        per["identity"] = torch.full((x0.shape[0],), math.nan)
        reasons = ["not_scored"] * x0.shape[0]
    return EditEvaluation(x_edit, per, reasons, identity_note)


__all__ = ["EditEvaluation", "evaluate_edit"]
