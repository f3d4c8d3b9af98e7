"""Disjoint data for the backbone, rectifier pretraining and evaluation; augmentation for
rectifier training. Pure functions: no files, no loading (wiring them into the prepared
datasets is left to the data path, hfedit/data.py).

Why: in the paper the rectifier corrects a backbone on images that backbone never saw (an
FFHQ-trained iDDPM, a rectifier trained on CelebA-HQ). When the backbone and the rectifier
train on the same images there is little for the rectifier to correct on them (measured here:
held-out DDIM L1 0.0219 -> 0.0219).

* :func:`assign_splits` puts every image id into one role -- ``backbone``, ``rectifier``,
  ``eval`` -- deterministically from the id and a seed alone (sha256 of ``"{seed}:{id}"``):
  the same id lands in the same role whatever else is in the dataset, in any order, so adding
  images never moves the old ones between roles.
* :func:`augment` flips, shifts (circularly) and jitters the colour of a batch of images with
  a ``torch.Generator``: rectifier training sees more than its few images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

ROLES = ("backbone", "rectifier", "eval")


@dataclass(frozen=True)
class SplitFractions:
    """Shares of the images per role; they must sum to 1 (each in [0, 1])."""

    backbone: float = 0.6
    rectifier: float = 0.25
    eval: float = 0.15

    def __post_init__(self) -> None:
        values = [self.backbone, self.rectifier, self.eval]
        if any(not 0.0 <= v <= 1.0 for v in values) or abs(sum(values) - 1.0) > 1e-9:
            raise ValueError(f"split fractions backbone={self.backbone}, rectifier="
                             f"{self.rectifier}, eval={self.eval}: each must be in [0, 1] and "
                             "they must sum to 1")


def _unit(seed: int, image_id: str) -> float:
    """A number in [0, 1) from sha256 of ``"{seed}:{id}"`` (uniform over ids)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def role_of(image_id: str, fractions: SplitFractions = SplitFractions(), seed: int = 0) -> str:
    """The role of one image id: ``backbone`` when its hash falls below the backbone share,
    ``rectifier`` below backbone + rectifier, else ``eval``."""
    u = _unit(seed, image_id)
    if u < fractions.backbone:
        return "backbone"
    if u < fractions.backbone + fractions.rectifier:
        return "rectifier"
    return "eval"


def assign_splits(ids: Iterable[str], fractions: SplitFractions = SplitFractions(),
                  seed: int = 0) -> dict[str, list[str]]:
    """``{role: [ids]}`` (each list in the input's order); every id in exactly one role.
    Duplicate ids are refused (they would leak one image into two roles)."""
    out: dict[str, list[str]] = {r: [] for r in ROLES}
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} appears twice: ids must be unique")
        seen.add(image_id)
        out[role_of(image_id, fractions, seed)].append(image_id)
    return out


# -------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augmentation:
    """``hflip``: probability of a horizontal flip; ``max_shift``: largest circular shift in
    pixels (each axis, uniform in [-max_shift, max_shift]); ``brightness`` / ``contrast`` /
    ``saturation``: largest relative change (uniform in [1 - v, 1 + v])."""

    hflip: float = 0.5
    max_shift: int = 2
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1


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


__all__ = ["ROLES", "Augmentation", "SplitFractions", "assign_splits", "augment", "role_of"]
