"""hfedit/training/augment.py: disjoint roles decided by the id alone; augmentation as a tensor function."""

from __future__ import annotations

import pytest
import torch

from hfedit.config import HfeditConfig
from hfedit.data.manifest import split_ids, split_roles
from hfedit.training.augment import Augmentation, augment
from hfedit.validation import config_problems

IDS = [f"faces/{i:04d}.jpg" for i in range(200)]


def test_every_id_has_exactly_one_role_in_the_configured_counts():
    train, rect, val = split_roles(IDS, 0.2, 0.3, seed=0)
    assert (len(train), len(rect), len(val)) == (100, 60, 40)
    assert sorted(train + rect + val) == sorted(IDS) and len(set(train + rect + val)) == len(IDS)
    # val is the train/val split's val: the rectifier's images come out of the backbone's
    assert split_ids(IDS, 0.2, seed=0) == (sorted(train + rect), val)
    assert split_roles(list(reversed(IDS)), 0.2, 0.3, seed=0) == (train, rect, val)  # a set
    other = split_roles(IDS, 0.2, 0.3, seed=1)
    assert other[1] != rect and other[2] != val  # another seed, another split
    assert split_roles(IDS, 0.2, 0.0, seed=0) == (sorted(train + rect), [], val)


def test_small_sets_keep_an_image_per_role_and_bad_fractions_are_refused():
    assert [len(r) for r in split_roles(IDS[:3], 0.1, 0.1, 0)] == [1, 1, 1]
    assert [len(r) for r in split_roles(IDS[:2], 0.4, 0.4, 0)] == [1, 0, 1]  # backbone keeps one
    with pytest.raises(ValueError, match="rectifier_fraction"):
        split_roles(IDS, 0.5, 0.5, 0)
    cfg = HfeditConfig()
    cfg.data.val_fraction, cfg.data.rectifier_fraction = 0.4, 0.6
    assert any("data.val_fraction + data.rectifier_fraction = 1.0 must be less than 1" in p
               for p in config_problems(cfg))


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


def test_duplicates_share_a_split_and_the_rest_split_as_by_id():
    """Splits were by id only: the same image under two names (or a link) landed in train and
    val. Groups rank by their smallest digest; ids without duplicates keep today's split."""
    from hfedit.data.manifest import id_digest
    from hfedit.data.sources import bundled_images

    ids = [i for i, _ in bundled_images()]  # the default source (params.yaml data.source)
    for vf, rf in ((0.2, 0.3), (0.2, 0.0)):
        ranked = sorted(ids, key=lambda i: id_digest(0, i))  # the split before groups existed
        n_val, n_rect = round(vf * len(ids)), round(rf * len(ids))
        val, rect = sorted(ranked[:n_val]), sorted(ranked[n_val:n_val + n_rect])
        assert split_roles(ids, vf, rf, 0)[1:] == (rect, val)
        assert split_roles(ids, vf, rf, 0, {i: f"content of {i}" for i in ids})[1:] == (rect, val)
    train, rect, val = split_roles(IDS, 0.2, 0.3, seed=0)
    copies = {i: "same" for i in (val[0], train[0], train[1], rect[0])}
    roles = split_roles(IDS, 0.2, 0.3, 0, copies)
    assert [sum(i in r for i in copies) for r in roles].count(len(copies)) == 1
    assert sorted(sum(roles, [])) == sorted(IDS)
