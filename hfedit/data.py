"""Image files <-> normalised tensors: strict loading, bundled real faces, the manifest, the split.

Every input file ends up either prepared or listed with a reason code (:data:`REASONS`) in
``manifest.json``; nothing is dropped silently and one bad file never stops the run.
Tensors are float32 ``(3, R, R)`` in [-1, 1] (``x = u8 / 127.5 - 1``). The prepared dataset
(uint8 Parquet shards, streamed) is :mod:`hfedit.dataset`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from hfedit.files import atomic_write, atomic_write_text
from hfedit.jpeg import JpegDataError, check_jpeg

if TYPE_CHECKING:  # torch is imported where tensors are made: decode workers never load it
    import torch

# reason code -> how the user fixes it (the message always names the file too)
REASONS: dict[str, str] = {
    "empty": "the file has 0 bytes; copy it again from its source or delete it",
    "not_an_image": "keep only image files (PNG, JPEG, TIFF, WebP, ...) in the folder",
    "truncated": "the file ends early (interrupted copy or download); copy it again",
    "corrupt": "the image data cannot be decoded; re-export the image or delete it",
    "too_large": "downscale the image, or raise data.max_pixels if it is genuine",
    "unsupported_mode": "re-save the image as 8-bit RGB or greyscale",
    "outside_root": "copy the file into the folder instead of linking to it",
    "broken_link": "the symlink's target does not exist; fix or remove the link",
    "not_a_file": "only regular files (or symlinks to files inside the folder) are read",
    "unreadable": "check the file's permissions",
}
# train: the backbone's images; rectifier: rectifier pretraining and edit training (the train
# images again when data.rectifier_fraction is 0); val: held out from every training (evaluation)
SPLITS = ("train", "rectifier", "val")


class ImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` is a code from :data:`REASONS`."""

    def __init__(self, reason: str, path: str | os.PathLike, detail: str):
        assert reason in REASONS, reason
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{path}: {detail.rstrip('.')}. Fix: {REASONS[reason]}")

    def __reduce__(self):  # crosses process boundaries (prepare's decode processes, Ray)
        return (type(self), (self.reason, self.path, self.detail))


class DatasetError(ValueError):
    """The source as a whole is unusable (missing folder, no good image)."""


@dataclass
class LoadedImage:
    """An RGB image plus what the file said: mode, (width, height) as stored, EXIF orientation."""

    image: Image.Image
    mode: str
    size: tuple[int, int]
    orientation: int = 1


# --------------------------------------------------------------------------------- loading
def load_image(path: str | os.PathLike, max_pixels: int) -> LoadedImage:
    """Decode ``path`` fully and strictly into an RGB image with EXIF orientation applied.

    Refuses (:class:`ImageError`) missing and empty files, non-images, images whose header
    declares more than ``max_pixels`` pixels (checked before decoding) or trips Pillow's bomb
    limit, truncated and corrupt data. Damage is found three ways: a full ``load()`` (Pillow must
    not pad truncated files), every warning Pillow gives while decoding made an error, and for
    JPEGs, whose decoder fills damaged data with garbage and only warns (which Pillow drops), a
    check of the compressed data itself (:func:`hfedit.jpeg.check_jpeg`).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated "
            "files would be silently padded with grey. Set it back to False before loading."
        )
    path = Path(path)
    try:
        if not path.exists():
            raise ImageError("not_a_file", path, "no such file" if not path.is_symlink()
                             else f"dangling symlink to {os.readlink(path)}")
        if not path.is_file():
            raise ImageError("not_a_file", path, "not a regular file (a folder, fifo, socket or device)")
        if path.stat().st_size == 0:
            raise ImageError("empty", path, "empty file (0 bytes)")
    except PermissionError as err:
        raise ImageError("unreadable", path, f"cannot read: {err.strerror}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a decoder's warning means damaged data ...
            warnings.simplefilter("default", DeprecationWarning)  # ... an API's does not
            with Image.open(path) as img:
                width, height = img.size  # from the header; nothing decoded yet
                if width * height > max_pixels:
                    raise ImageError("too_large", path, f"header declares {width}x{height} = "
                                     f"{width * height} pixels > data.max_pixels={max_pixels}")
                img.load()  # full decode: raises on truncated or corrupt data
                orientation = int(img.getexif().get(0x0112, 1))
                if img.format in ("JPEG", "MPO"):
                    check_jpeg(path.read_bytes())
                mode, icc = img.mode, img.info.get("icc_profile")
                with warnings.catch_warnings():  # converting valid pixels may warn: not damage
                    warnings.simplefilter("default")
                    rgb = to_rgb(ImageOps.exif_transpose(img), icc_profile=icc, name=str(path))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_large", path, f"over PIL.Image.MAX_IMAGE_PIXELS: {err}") from None
    except JpegDataError as err:
        raise ImageError("truncated" if err.truncated else "corrupt", path,
                         f"damaged JPEG data: {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", path, "not an image Pillow can identify") from None
    except PermissionError as err:
        raise ImageError("unreadable", path, f"cannot read: {err.strerror}") from None
    except MemoryError:
        raise
    except Exception as err:  # plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        # (and warnings, made errors above: UserWarning, RuntimeWarning, ...)
        text = f"{type(err).__name__}: {err}"
        if isinstance(err, EOFError) or "truncated" in str(err).lower():
            raise ImageError("truncated", path, f"truncated image data ({text})") from None
        if "too large" in str(err).lower():
            raise ImageError("too_large", path, text) from None
        raise ImageError("corrupt", path, f"cannot decode ({text})") from None
    return LoadedImage(rgb, mode, (width, height), orientation)


_WIDE = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
_PLAIN = {"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def to_rgb(img: Image.Image, icc_profile: Optional[bytes] = None, name: str = "<image>") -> Image.Image:
    """Convert any supported mode to 8-bit RGB.

    Alpha (LA, PA, RGBA, transparent P) is composited on white; 16-bit ``I;16*`` and ``I`` map
    0..65535 linearly to 0..255 (``round(v / 257)``, no clipping at 255); ``F`` maps [0, 1] to
    0..255 when its maximum is <= 1, else is clipped to 0..255; CMYK/YCbCr/LAB/HSV use Pillow's
    colour conversions; an embedded ICC profile (RGB, RGBA, CMYK) is converted to sRGB first.
    """
    if img.mode not in _WIDE | _ALPHA | _PLAIN | {"P"}:
        raise ImageError("unsupported_mode", name, f"unsupported image mode {img.mode!r}")
    if icc_profile and img.mode in ("RGB", "RGBA", "CMYK"):
        img = _icc_to_srgb(img, icc_profile)
    if img.mode in _WIDE:
        values = np.asarray(img).astype(np.float64)  # (H, W)
        if img.mode == "F":
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255 exactly
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        has_alpha = "transparency" in img.info or (img.palette and img.palette.mode == "RGBA")
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.mode in _ALPHA:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _icc_to_srgb(img: Image.Image, icc_profile: bytes) -> Image.Image:
    """Colour-manage ``img`` from its embedded profile to sRGB; unchanged if the profile fails."""
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(img, source, srgb, outputMode=out_mode)
    except Exception:  # a broken profile does not make the pixels unusable
        return img


# ------------------------------------------------------------------------- tensors <-> PIL
def _square_u8(img: Image.Image, resolution: int, center_crop: bool = True) -> np.ndarray:
    """Centred square crop (or the whole image) resized with Lanczos -> (R, R, 3) uint8."""
    img = to_rgb(img)
    if center_crop:  # crop first, so no pixel outside the square leaks in through the filter
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    out = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.array(out, dtype=np.uint8)  # (R, R, 3)


def _u8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(arr).movedim(-1, -3).float().div(127.5).sub(1.0)


def to_tensor(img: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """PIL image -> (3, R, R) float32 in [-1, 1]: centred square crop, then Lanczos resize
    (antialiased when downsampling). ``center_crop=False`` squashes the whole image instead."""
    return _u8_to_tensor(_square_u8(img, resolution, center_crop))


def tensor_to_u8(tensor: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) tensor in [-1, 1] -> (..., H, W, 3) uint8: the exact inverse of
    :func:`to_tensor`'s scaling."""
    import torch

    x = tensor.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("tensor holds NaN or inf values")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).numpy()


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image; exact inverse of :func:`to_tensor`'s scaling."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    try:
        return Image.fromarray(tensor_to_u8(tensor))
    except ValueError as err:
        raise ValueError(f"to_pil: {err}") from None


def save_png(tensor: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (3, H, W) [-1, 1] tensor as a PNG, atomically."""
    img = to_pil(tensor)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def make_grid_png(tensors: torch.Tensor | Iterable[torch.Tensor], path: str | os.PathLike,
                  nrow: int = 8, row_labels: Optional[list[str]] = None,
                  column_labels: Optional[list[str]] = None, min_cell: int = 64) -> Path:
    """Save (N, 3, H, W) [-1, 1] images as one PNG grid (:func:`write_grid_png`)."""
    import torch

    batch = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
    if batch.ndim != 4 or batch.shape[0] == 0 or batch.shape[1] != 3:
        raise ValueError(f"make_grid_png expects (N>0, 3, H, W), got {tuple(batch.shape)}")
    return write_grid_png(tensor_to_u8(batch), path, nrow, row_labels, column_labels, min_cell)


GRID_PADDING = 2  # pixels around every cell of a grid (torchvision's make_grid default)


def grid_u8(images: np.ndarray, nrow: int = 8, padding: int = GRID_PADDING) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (H', W', 3) uint8 grid, ``nrow`` images per row, white
    padding: torchvision's ``make_grid`` layout, in numpy (prepare's processes import no torch)."""
    n, h, w, _ = images.shape
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), 255,
                   np.uint8)
    for i, img in enumerate(images):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[y: y + h, x: x + w] = img
    return grid


def write_grid_png(images: np.ndarray, path: str | os.PathLike, nrow: int = 8,
                   row_labels: Optional[list[str]] = None,
                   column_labels: Optional[list[str]] = None, min_cell: int = 64) -> Path:
    """Save (N, H, W, 3) uint8 images as one PNG grid, ``nrow`` per row, white padding.

    With ``row_labels`` (one per row) and/or ``column_labels`` (one per column) the grid is
    drawn with a label beside each row and above each column, and enlarged by an integer factor
    (nearest neighbour: every pixel stays a block of the source's colour) until a cell is at
    least ``min_cell`` pixels, so that 32 px images and their labels are readable."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"write_grid_png expects (N>0, H, W, 3) uint8, got {images.shape} {images.dtype}")
    grid = Image.fromarray(grid_u8(images, nrow))
    if row_labels is not None or column_labels is not None:
        rows, cols = -(-images.shape[0] // nrow), min(nrow, images.shape[0])
        for name, labels, want in (("row_labels", row_labels, rows),
                                   ("column_labels", column_labels, cols)):
            if labels is not None and len(labels) != want:
                raise ValueError(f"make_grid_png: {len(labels)} {name} for a grid of {rows} rows "
                                 f"x {cols} columns")
        grid = labelled_grid(grid, images.shape[1:3], rows, cols, row_labels, column_labels,
                             min_cell)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def labelled_grid(grid: Image.Image, cell: tuple[int, int], rows: int, cols: int,
                  row_labels: Optional[list[str]], column_labels: Optional[list[str]],
                  min_cell: int) -> Image.Image:
    """``grid`` (:func:`grid_u8`'s layout) enlarged and framed by its labels."""
    from PIL import ImageDraw, ImageFont

    h, w = int(cell[0]), int(cell[1])
    scale = max(1, -(-min_cell // min(h, w)))
    big = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    margin = 6
    left = (max(size(t)[0] for t in row_labels) + 2 * margin) if row_labels else 0
    top = (max(size(t)[1] for t in column_labels) + 2 * margin) if column_labels else 0
    out = Image.new("RGB", (big.width + left, big.height + top), "white")
    out.paste(big, (left, top))
    draw = ImageDraw.Draw(out)
    pad = GRID_PADDING * scale
    pitch_y, pitch_x = (h + GRID_PADDING) * scale, (w + GRID_PADDING) * scale  # cell + padding
    for r, text in enumerate(row_labels or []):
        tw, th = size(text)
        y = top + pad + r * pitch_y + (h * scale - th) // 2
        draw.text((left - margin - tw, y), text, fill="black", font=font)
    for c, text in enumerate(column_labels or []):
        tw, th = size(text)
        x = left + pad + c * pitch_x + (w * scale - tw) // 2
        draw.text((x, margin), text, fill="black", font=font)
    return out


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
            else:
                loaded = load_image(item.path, settings["max_pixels"])
        except ImageError as err:
            row = ManifestRow(item.id, item.source, "error", err.reason, str(err))
            out.append((dataclasses.asdict(row), None))
            continue
        u8 = _square_u8(loaded.image, settings["resolution"], settings["center_crop"])
        row = ManifestRow(item.id, item.source, "ok", mode=loaded.mode, size=list(loaded.size),
                          orientation=loaded.orientation)
        out.append((dataclasses.asdict(row), u8.tobytes()))
    return out


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
    shard: Optional[int] = None  # where its pixels are (hfedit.dataset)
    row: Optional[int] = None


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
                seed: int) -> tuple[list[str], list[str], list[str]]:
    """Disjoint roles, as in the paper (a backbone trained on FFHQ, a rectifier on CelebA-HQ,
    evaluation on held-out images): ``(train, rectifier, val)``, each sorted by id.

    Ids are ranked by sha256(f"{seed}:{id}") (:func:`id_digest`): the first
    ``round(val_fraction * n)`` go to val (as :func:`split_ids`), the next
    ``round(rectifier_fraction * n)`` to the rectifier's split (at least 1 when the fraction is
    positive), the rest train the backbone (at least 1 image). ``rectifier_fraction`` 0: no
    rectifier split of its own (the rectifier trains on the backbone's images). Depends only on
    the *set* of ids, so a split is the same in every process and on every rerun."""
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
    ranked = sorted(unique, key=lambda i: id_digest(seed, i))
    val, rect = set(ranked[:n_val]), set(ranked[n_val:n_val + n_rect])
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
