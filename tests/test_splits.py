"""hfedit/splits.py: disjoint roles decided by the id alone; augmentation as a tensor function."""

from __future__ import annotations

import pytest
import torch

from hfedit.splits import Augmentation, SplitFractions, assign_splits, augment, role_of

IDS = [f"faces/{i:04d}.jpg" for i in range(2000)]


def test_every_id_has_exactly_one_role_in_the_configured_shares():
    roles = assign_splits(IDS, SplitFractions(0.6, 0.25, 0.15), seed=0)
    flat = [i for r in roles.values() for i in r]
    assert sorted(flat) == sorted(IDS) and len(set(flat)) == len(IDS)
    for role, share in (("backbone", 0.6), ("rectifier", 0.25), ("eval", 0.15)):
        assert abs(len(roles[role]) / len(IDS) - share) < 0.045  # 4 binomial standard deviations at 2000 ids


def test_a_role_depends_on_the_id_and_seed_alone():
    a = assign_splits(IDS[:500], seed=1)
    b = assign_splits(list(reversed(IDS)) + ["new/extra.png"], seed=1)  # other order, more ids
    for role in a:
        assert set(a[role]) <= set(b[role])
    assert role_of("x.png", seed=1) == role_of("x.png", seed=1)
    moved = sum(role_of(i, seed=1) != role_of(i, seed=2) for i in IDS)
    assert moved > 500  # another seed, another split


def test_bad_fractions_and_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="appears twice"):
        assign_splits(["a", "b", "a"])
    only_eval = assign_splits(IDS[:50], SplitFractions(0.0, 0.0, 1.0))
    assert only_eval["eval"] == IDS[:50] and not only_eval["backbone"]


def test_augmentation_off_is_the_identity_and_on_stays_in_range(faces):
    none = Augmentation(hflip=0.0, max_shift=0, brightness=0.0, contrast=0.0, saturation=0.0)
    assert torch.allclose(augment(faces, none), faces, atol=1e-6)
    flip = Augmentation(hflip=1.0, max_shift=0, brightness=0.0, contrast=0.0, saturation=0.0)
    assert torch.allclose(augment(faces, flip), faces.flip(-1), atol=1e-6)
    shift = Augmentation(hflip=0.0, max_shift=3, brightness=0.0, contrast=0.0, saturation=0.0)
    out = augment(faces, shift, torch.Generator().manual_seed(0))
    # each image is a circular shift of its source by at most 3 pixels per axis
    for x, y in zip(faces, out):
        assert any(torch.allclose(torch.roll(x, (dy, dx), (-2, -1)), y, atol=1e-6)
                   for dy in range(-3, 4) for dx in range(-3, 4))
    full = augment(faces, Augmentation(), torch.Generator().manual_seed(1))
    assert full.abs().max() <= 1 and (full - faces).abs().mean() > 1e-3
    again = augment(faces, Augmentation(), torch.Generator().manual_seed(1))
    assert torch.equal(full, again)
