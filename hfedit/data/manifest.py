"""What prepare did, per input (:class:`Manifest`), and the seeded split of ids into
disjoint roles (train, rectifier, val).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

from hfedit.files import atomic_write_text

# train: the backbone's images; rectifier: rectifier pretraining and edit training (the train
# images again when data.rectifier_fraction is 0); val: held out from every training (evaluation)
SPLITS = ("train", "rectifier", "val")


class DatasetError(ValueError):
    """The source as a whole is unusable (missing folder, no good image)."""


# -------------------------------------------------------------------------------- manifest
@dataclass
class ManifestRow:
    """One input: ``status`` "ok" (then ``split``/``index`` is its place in the split and
    ``shard``/``row`` where its pixels are stored) or "error"."""

    id: str
    source: str
    status: str
    reason: Optional[str] = None
    message: Optional[str] = None
    split: Optional[str] = None
    index: Optional[int] = None
    mode: Optional[str] = None
    size: Optional[list[int]] = None  # [width, height] as stored in the file
    orientation: Optional[int] = None
    shard: Optional[int] = None  # where its pixels are (hfedit.data.prepared)
    row: Optional[int] = None
    content: Optional[str] = None  # sha256 prefix of its decoded pixels: duplicates share it
    # what decoding proved about the file (hfedit.data.images.INTEGRITY): checksum, structure or
    # unverified; None for bundled images (decoded from arrays in the installed wheels)
    integrity: Optional[str] = None


@dataclass
class Manifest:
    """What ``prepare`` did: its config, counts, and one row per input file."""

    source: str
    config: dict
    counts: dict
    rows: list[ManifestRow] = field(default_factory=list)

    @property
    def refused(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.status == "error"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(d["source"], d["config"], d["counts"], [ManifestRow(**r) for r in d["rows"]])


def id_digest(seed: int, id_: str) -> bytes:
    """sha256 of ``"{seed}:"`` + the id's bytes as the file system holds them (``os.fsencode``:
    a file name that is not valid UTF-8 has its own bytes, not an encoding error)."""
    return hashlib.sha256(f"{seed}:".encode() + os.fsencode(id_)).digest()


def printable(name: str) -> str:
    """``name`` for a text file or a terminal: bytes that are not UTF-8 (held as surrogates)
    shown as ``\\xNN`` escapes; valid names unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def split_ids(ids: Iterable[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/val split that depends only on the *set* of ids: ids are ranked by
    sha256(f"{seed}:{id}") (:func:`id_digest`) and the first ``round(val_fraction * n)`` (at least 1 when n >= 2 and
    val_fraction > 0, at most n - 1) go to val. Returns (train, val), each sorted by id."""
    train, _, val = split_roles(ids, val_fraction, 0.0, seed)
    return train, val


def split_roles(ids: Iterable[str], val_fraction: float, rectifier_fraction: float,
                seed: int, groups: Optional[Mapping[str, str]] = None
                ) -> tuple[list[str], list[str], list[str]]:
    """Disjoint roles, as in the paper (a backbone trained on FFHQ, a rectifier on CelebA-HQ,
    evaluation on held-out images): ``(train, rectifier, val)``, each sorted by id.

    Ids are ranked by sha256(f"{seed}:{id}") (:func:`id_digest`): the first
    ``round(val_fraction * n)`` go to val (as :func:`split_ids`), the next
    ``round(rectifier_fraction * n)`` to the rectifier's split (at least 1 when the fraction is
    positive), the rest train the backbone (at least 1 image). ``rectifier_fraction`` 0: no
    rectifier split of its own (the rectifier trains on the backbone's images). Depends only on
    the *set* of ids, so a split is the same in every process and on every rerun.

    ``groups`` (id -> content key): ids with the same key (the same image under two names, a
    link) go to one split, the group ranked by its members' smallest digest and taken whole
    while its split still has room; ids without duplicates are split exactly as without it."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
    if not 0.0 <= rectifier_fraction < 1.0 or val_fraction + rectifier_fraction >= 1.0:
        raise ValueError(f"data.rectifier_fraction={rectifier_fraction} must lie in [0, 1) and "
                         f"leave images for the backbone (data.val_fraction + "
                         f"data.rectifier_fraction = {val_fraction + rectifier_fraction} >= 1)")
    unique = sorted(set(ids))
    n = len(unique)
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(val_fraction * n)))
    n_rect = 0 if rectifier_fraction == 0 else max(1, round(rectifier_fraction * n))
    n_rect = max(0, min(n_rect, n - n_val - 1))  # the backbone keeps at least one image
    members: dict[str, list[str]] = {}
    for i in unique:
        members.setdefault((groups or {}).get(i) or f"id:{i}", []).append(i)
    ranked = sorted(members.values(), key=lambda g: min(id_digest(seed, i) for i in g))
    val: set[str] = set()
    rect: set[str] = set()
    for group in ranked:  # (whole groups; the backbone still keeps at least one image)
        if len(val) < n_val and len(val) + len(group) < n:
            val.update(group)
        elif len(rect) < n_rect and len(val) + len(rect) + len(group) < n:
            rect.update(group)
    return ([i for i in unique if i not in val and i not in rect],
            [i for i in unique if i in rect], [i for i in unique if i in val])


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir``/manifest.json atomically."""
    text = json.dumps(manifest.to_dict(), indent=1)
    return atomic_write_text(Path(out_dir) / "manifest.json", text)


def load_manifest(prepared_dir: str | os.PathLike) -> Manifest:
    """Read ``prepared_dir``/manifest.json."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage (stages/prepare.py)")
    return Manifest.from_dict(json.loads(path.read_text()))
