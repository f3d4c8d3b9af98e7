"""Augmentation for rectifier training: a batch flipped, shifted and colour-jittered.

Why: in the paper the rectifier corrects a backbone on images that backbone never saw (an
FFHQ-trained iDDPM, a rectifier trained on CelebA-HQ); prepare gives it images of its own
(``data.rectifier_fraction``, :func:`hfedit.data.manifest.split_roles`), and pretraining augments them
(``pretrain.augment``) so that it sees more than those few images. A pure tensor function: the
draws come from a ``torch.Generator`` (pretraining's per-(rank, step) generator, so a resumed
run draws what the first would).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hfedit.config import Augmentation  # the settings live in the config (pretrain.augment)


def augment(x: Tensor, aug: Augmentation = Augmentation(),
            generator: Optional[torch.Generator] = None) -> Tensor:
    """A randomly flipped, shifted and colour-jittered copy of ``x`` (B, 3, H, W) in [-1, 1],
    each image with its own draw; the result is clamped to [-1, 1]. With every setting 0 it is
    ``x`` itself (a copy)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"augment expects (B, 3, H, W) images, got {tuple(x.shape)}")
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    flip = torch.rand(b, generator=generator) < aug.hflip
    shifts = torch.randint(-aug.max_shift, aug.max_shift + 1, (b, 2), generator=generator)
    bright = uniform(1 - aug.brightness, 1 + aug.brightness)
    contrast = uniform(1 - aug.contrast, 1 + aug.contrast)
    sat = uniform(1 - aug.saturation, 1 + aug.saturation)
    out = []
    for i in range(b):
        img = x[i].flip(-1) if flip[i] else x[i]
        img = torch.roll(img, shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(-2, -1))
        u = (img + 1) / 2  # [0, 1]
        u = u * float(bright[i])
        mean = u.mean()
        u = (u - mean) * float(contrast[i]) + mean
        grey = (0.299 * u[0] + 0.587 * u[1] + 0.114 * u[2])[None]
        u = (u - grey) * float(sat[i]) + grey
        out.append(u * 2 - 1)
    return torch.stack(out).clamp(-1, 1)


__all__ = ["Augmentation", "augment"]
