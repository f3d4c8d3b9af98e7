"""Where prepare's images come from: a folder walked safely (links checked against the
root, specials refused), or the real faces bundled inside installed wheels; and the decode of
one input into its manifest row and pixels (run in prepare's decode processes, without torch).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from hfedit.data.images import (
    ImageError,
    LoadedImage,
    _square_u8,
    load_image,
    load_image_bytes,
    to_rgb,
)
from hfedit.config import DataConfig
from hfedit.data.manifest import DatasetError, ManifestRow
from hfedit.storage import Location, is_uri, join


# ---------------------------------------------------------------------------------- decode
@dataclass
class Input:
    """One input of ``prepare``: a file (``path``), a bundled image (``image``), or a refusal
    known before decoding (``error``)."""

    id: str
    source: str
    path: Optional[str] = None
    image: object = None  # PIL image of a bundled source
    error: Optional[ImageError] = None


def decode_inputs(items: list[Input], settings: dict) -> list[tuple[dict, Optional[bytes]]]:
    """Decode + crop + resize each input as ``prepare`` does (``settings``: resolution,
    center_crop, max_pixels): per input its manifest row (a dict) and its (R, R, 3) uint8
    pixels as bytes, None when refused. Runs in prepare's decode processes, which import
    this module and not torch."""
    out = []
    for item in items:
        try:
            if item.error is not None:
                raise item.error
            if item.image is not None:
                loaded = LoadedImage(to_rgb(item.image), item.image.mode, item.image.size)
            elif is_uri(item.path):
                loaded = load_image_bytes(_read_object(item.path), item.path, settings["max_pixels"],
                                          require_verified=settings.get("require_verified", False))
            else:
                loaded = load_image(item.path, settings["max_pixels"],
                                    require_verified=settings.get("require_verified", False))
        except ImageError as err:
            row = ManifestRow(item.id, item.source, "error", err.reason, str(err))
            out.append((dataclasses.asdict(row), None))
            continue
        u8 = _square_u8(loaded.image, settings["resolution"], settings["center_crop"])
        row = ManifestRow(item.id, item.source, "ok", mode=loaded.mode, size=list(loaded.size),
                          orientation=loaded.orientation,
                          integrity=None if item.image is not None else loaded.integrity)
        out.append((dataclasses.asdict(row), u8.tobytes()))
    return out


def _read_object(uri: str) -> bytes:
    """An input object's bytes; what the store refuses is an :class:`ImageError`."""
    try:
        return Location(uri).read_bytes()
    except FileNotFoundError:
        raise ImageError("unreadable", uri, "listed, then gone from the store") from None
    except OSError as err:
        raise ImageError("unreadable", uri, str(err)) from None


# --------------------------------------------------------------------------------- sources
ASTRONAUT_FACE = (slice(30, 230), slice(140, 340))  # rows, cols of skimage's 512x512 astronaut
GRACE_HOPPER_FACE = (120, 60, 400, 340)  # PIL box (left, top, right, bottom) of the 512x600 photo
LFW_FACES = 100  # lfw_subset()[:100] are faces, [100:] are not


def bundled_images() -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(source_id, image)`` for real face photos shipped inside installed wheels
    (nothing is downloaded): 100 LFW 25x25 grey crops, skimage's astronaut and matplotlib's
    Grace Hopper, each cropped to the face."""
    from matplotlib import cbook
    from skimage import data

    lfw = np.asarray(data.lfw_subset()[:LFW_FACES])  # (100, 25, 25) float64 in [0, 1]
    for i, face in enumerate(lfw):
        yield f"skimage/lfw_subset/{i:03d}", Image.fromarray(np.round(face * 255).astype(np.uint8))
    yield "skimage/astronaut", Image.fromarray(np.ascontiguousarray(data.astronaut()[ASTRONAUT_FACE]))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as grace:
        yield "matplotlib/grace_hopper", grace.convert("RGB").crop(GRACE_HOPPER_FACE)


@dataclass
class FolderEntry:
    """One file under an image folder: ``id`` is its path relative to the root (POSIX);
    ``error`` is set when it must not be opened (symlink outside the root, fifo, ...)."""

    id: str
    path: Path
    error: Optional[ImageError] = None


def iter_folder(root: str | os.PathLike) -> Iterator[FolderEntry]:
    """Every file under ``root``, recursively, sorted by relative path.

    Symlinks are resolved: those leading outside ``root`` (``outside_root``), dangling ones and
    directory symlinks are reported, never followed; special files are ``not_a_file``.
    """
    root = Path(root)
    real_root = root.resolve()
    if not real_root.is_dir():
        raise DatasetError(f"data.source={str(root)!r}: no such folder (use a folder of images "
                           "or 'bundled')")
    found: list[FolderEntry] = []

    def on_error(err: OSError) -> None:
        rel = Path(err.filename).relative_to(real_root).as_posix()
        found.append(FolderEntry(rel, root / rel, ImageError("unreadable", root / rel, str(err))))

    for folder, dirs, files in os.walk(real_root, followlinks=False, onerror=on_error):
        for name in dirs + files:
            real = Path(folder) / name
            rel = real.relative_to(real_root).as_posix()
            path = root / rel
            error = None
            if real.is_symlink():
                try:
                    target = real.resolve()
                except (OSError, RuntimeError):  # symlink loop
                    target = real
                if not target.is_relative_to(real_root):
                    error = ImageError("outside_root", path,
                                       f"symlink to {target}, outside {real_root}; not followed")
                elif not target.exists():
                    error = ImageError("broken_link", path, f"dangling symlink to {target}")
                elif target.is_dir():
                    error = ImageError("not_a_file", path, "directory symlink; not followed")
            elif name in dirs:
                continue  # a real sub-folder: os.walk descends into it
            elif not real.is_file():
                error = ImageError("not_a_file", path, "not a regular file (fifo, socket, device)")
            found.append(FolderEntry(rel, path, error))
    yield from sorted(found, key=lambda e: e.id)


def list_inputs(cfg: DataConfig) -> list[Input]:
    """Every input of ``cfg.source`` sorted by id, cut to ``cfg.max_images`` (0 = all). A URI
    source (``s3://bucket/photos``) is every object under that prefix, its id the name below it."""
    if cfg.source == "bundled":
        inputs = [Input(sid, f"bundled:{sid}", image=img) for sid, img in bundled_images()]
    elif is_uri(cfg.source):
        names = Location(cfg.source).files()
        if not names:
            raise DatasetError(f"data.source={cfg.source!r}: no objects under this prefix (give "
                               "the prefix that holds the images, or a folder, or 'bundled')")
        inputs = [Input(rel, join(cfg.source, rel), path=join(cfg.source, rel)) for rel in names]
    else:
        inputs = [Input(e.id, str(e.path), path=str(e.path), error=e.error)
                  for e in iter_folder(cfg.source)]
    return inputs[: cfg.max_images] if cfg.max_images else inputs
