"""How good an edit is, on held-out images: edit strength and fidelity to the source.

For source images ``x0`` and their edits ``x_edit`` (by :class:`hfedit.editing.editor.Editor`: invert
once, replay through the attribute's rectifier), per image:

- ``clip_direction``: cos(E_I(x_edit) - E_I(x0), E_T(target) - E_T(source)), the directional CLIP
  similarity (edit strength; higher = more along the text direction; 0 = no movement);
- ``l1``, ``ssim``, ``psnr``: fidelity to the source on [0, 1] images (:mod:`hfedit.evaluation.metrics`);
- ``identity``: dlib face-descriptor cosine similarity (:mod:`hfedit.evaluation.identity`), NaN where no
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

from hfedit.evaluation import metrics as M
from hfedit.models.clip import DirectionalClipLoss

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
        """Per metric the mean over the images and ``<metric>_std``, their sample standard
        deviation (0 for one image); identity over the images where a face was scored (None
        when none was); ``images``: how many."""
        from hfedit.evaluation.reconstruction import mean_std

        out: dict[str, object] = {}
        for k, v in self.per_image.items():
            if k == "identity":
                continue
            stats = mean_std(v.float())
            out[k], out[f"{k}_std"] = float(v.float().mean()), stats["std"]
        ident = self.per_image.get("identity")
        if ident is not None:
            scored = int(torch.isfinite(ident).sum())
            stats = mean_std(ident)
            out["identity"] = M.mean_finite(ident) if scored else None  # null in JSON
            out["identity_std"] = stats["std"] if scored else None
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

    ``identity``: an :class:`hfedit.evaluation.identity.IdentityScorer` (or None: not scored, with
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


# --------------------------------------------------------------- the ablation's intervals
@dataclass(frozen=True)
class EditInterval:
    """Where an edit runs: ``mode`` (edit-friendly replay or DDIM), ``num_steps`` strided
    timesteps of which the first ``skip`` are skipped, so sampling starts at ``start`` (a
    timestep) and runs down to 0."""

    mode: str
    num_steps: int
    skip: int
    start: int

    @property
    def label(self) -> str:
        return f"{self.mode} {self.start}->0 ({self.num_steps - self.skip} of N={self.num_steps})"

    def inversion(self, base):
        """``base`` (an :class:`hfedit.config.InversionConfig`) set to this interval."""
        from dataclasses import replace

        from hfedit.config import EditMode

        return replace(base, mode=EditMode(self.mode), num_steps=self.num_steps, skip=self.skip)


def ablation_intervals(inversion, t0: int, schedule) -> dict[str, dict[str, EditInterval]]:
    """The intervals of the paper's Fig. 6 for each method, ``{method: {"own", "full"}}``:

    * ``score_matching`` (Algorithm 1) edits through the whole chain: its own interval is
      ``inversion`` as configured (``mode``, ``skip``), its full one the same from ``skip`` 0;
    * ``markovian`` (DiffusionCLIP-style, trained on a DDIM chain from ``t0``): its own interval
      is DDIM inversion + sampling from the largest strided timestep <= ``t0`` (``t0`` itself
      when it lies on the grid of ``inversion.num_steps``), its full one DDIM from ``x_T``;
    * ``backbone`` (no rectifier) on every distinct interval of the two: ``score_matching``,
      ``markovian`` (own), ``full`` (DDIM from x_T).
    """
    from hfedit.config import EditMode

    n = inversion.num_steps
    ts = schedule.timesteps(n)
    if t0 < 0:
        raise ValueError(f"edits.markovian.t0={t0} must be >= 0")
    skip_t0 = next(i for i, t in enumerate(ts) if t <= t0)
    mode = EditMode(inversion.mode).value

    def at(m: str, skip: int) -> EditInterval:
        return EditInterval(m, n, skip, ts[skip])

    sm_own, sm_full = at(mode, inversion.skip), at(mode, 0)
    mk_own, mk_full = at(EditMode.ddim.value, skip_t0), at(EditMode.ddim.value, 0)
    backbone = {"score_matching": sm_own, "markovian": mk_own, "full": mk_full}
    return {"score_matching": {"own": sm_own, "full": sm_full},
            "markovian": {"own": mk_own, "full": mk_full},
            "backbone": backbone}


__all__ += ["EditInterval", "ablation_intervals"]
