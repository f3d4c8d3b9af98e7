"""Image files -> RGB pixels -> normalised tensors, strictly: every refusal is an
:class:`ImageError` with a reason code from :data:`REASONS` and the fix.

Tensors are float32 ``(3, R, R)`` in [-1, 1] (``x = u8 / 127.5 - 1``). Imports neither torch
(except where a tensor is made) nor anything of hfedit but the file writer and the JPEG check.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from hfedit.files import atomic_write
from hfedit.data.jpeg import JpegDataError, check_jpeg

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
    "broken_link": "the symlink's target does not exist (or the link loops); fix or remove the link",
    "not_a_file": "only regular files (or symlinks to files inside the folder) are read",
    "unreadable": "check the file's permissions",
    "name_too_long": "rename the file: its output name (with .png) must fit in 255 bytes",
    "name_collision": "rename the file or the folder: their outputs would have the same path",
    "unverified": "convert it to PNG (checksummed) from an intact copy, or set "
                  "data.require_verified=false to accept files whose damage cannot be detected",
}

# What a successful decode says about a file's bytes, by format (Pillow's name): the manifests'
# ``integrity``. "checksum": checksums cover the data and matched (PNG: the zlib stream's
# Adler-32, and each header chunk's CRC-32). "structure": the format has no checksum, but damage
# breaks its coded data, which is walked and decoded strictly (JPEG: hfedit.data.jpeg and
# libjpeg-turbo with warnings as errors; GIF: Pillow's LZW decoder); damage that leaves valid
# codes passes. Anything else is "unverified": the decoder accepts damaged data without a sign
# (WebP lossy and lossless: libwebp itself decodes them; TIFF: an in-range wrong strip offset, and
# libtiff stops inflating a deflate strip before its checksum; BMP: raw pixels).
# benchmarks/damage_detection.py measures each format against the same damage.
INTEGRITY: dict[str, str] = {"PNG": "checksum", "JPEG": "structure", "MPO": "structure",
                             "GIF": "structure"}
UNVERIFIED = "unverified"


def integrity_of(image_format: Optional[str]) -> str:
    """``checksum``, ``structure`` or ``unverified`` for a Pillow format name (see
    :data:`INTEGRITY`)."""
    return INTEGRITY.get(image_format or "", UNVERIFIED)


class ImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` is a code from :data:`REASONS`."""

    def __init__(self, reason: str, path: str | os.PathLike, detail: str):
        assert reason in REASONS, reason
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"{path}: {detail.rstrip('.')}. Fix: {REASONS[reason]}")

    def __reduce__(self):  # crosses process boundaries (prepare's decode processes, Ray)
        return (type(self), (self.reason, self.path, self.detail))


@dataclass
class LoadedImage:
    """An RGB image plus what the file said: mode, (width, height) as stored, EXIF orientation."""

    image: Image.Image
    mode: str
    size: tuple[int, int]
    orientation: int = 1
    integrity: str = UNVERIFIED  # what the decode proved about the bytes: :data:`INTEGRITY`


# --------------------------------------------------------------------------------- loading
def load_image(path: str | os.PathLike, max_pixels: int,
               root: Optional[str | os.PathLike] = None,
               require_verified: bool = False) -> LoadedImage:
    """Decode ``path`` fully and strictly into an RGB image with EXIF orientation applied.

    Refuses (:class:`ImageError`) missing and empty files, non-images, images whose header
    declares more than ``max_pixels`` pixels (checked before decoding) or trips Pillow's bomb
    limit, truncated and corrupt data. Damage is found three ways: a full ``load()`` (Pillow must
    not pad truncated files), every warning Pillow gives while decoding made an error, and for
    JPEGs, whose decoder fills damaged data with garbage and only warns (which Pillow drops), a
    check of the compressed data itself (:func:`hfedit.data.jpeg.check_jpeg`). The file is opened
    once and decoded from that handle; with ``root``, a file that handle reaches outside ``root``
    (an input swapped for a link after it was listed) is refused (``outside_root``) unread.
    The result's ``integrity`` says what the decode proved (:data:`INTEGRITY`); with
    ``require_verified`` (``data.require_verified``) a format that can hide damage is refused
    (``unverified``) before its pixels are decoded.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated "
            "files would be silently padded with grey. Set it back to False before loading."
        )
    path = Path(path)
    return _decode(_open(path, root), path, max_pixels, require_verified)


def load_image_bytes(data: bytes, name: str, max_pixels: int,
                     require_verified: bool = False) -> LoadedImage:
    """:func:`load_image` of a file's bytes (an object read from a store); ``name`` (its URI)
    names it in errors. Empty data is refused (``empty``) as an empty file is."""
    if not data:
        raise ImageError("empty", name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels, require_verified)


def _decode(source, path, max_pixels: int, require_verified: bool) -> LoadedImage:
    """The body of :func:`load_image`: decode the open binary ``source`` (closed after)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a decoder's warning means damaged data ...
            warnings.simplefilter("default", DeprecationWarning)  # ... an API's does not
            with source, Image.open(source) as img:
                width, height = img.size  # from the header; nothing decoded yet
                if width * height > max_pixels:
                    raise ImageError("too_large", path, f"header declares {width}x{height} = "
                                     f"{width * height} pixels > data.max_pixels={max_pixels}")
                integrity = integrity_of(img.format)
                if require_verified and integrity == UNVERIFIED:
                    raise ImageError("unverified", path, f"{img.format} data carries nothing that "
                                     "shows damage, and data.require_verified is true")
                img.load()  # full decode: raises on truncated or corrupt data
                orientation = int(img.getexif().get(0x0112, 1))
                if img.format in ("JPEG", "MPO"):
                    source.seek(0)
                    check_jpeg(source.read())
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
    return LoadedImage(rgb, mode, (width, height), orientation, integrity)


def _open(path: Path, root: Optional[str | os.PathLike]):
    """``path`` opened for reading (without blocking on a FIFO): a regular, non-empty file whose
    real path, read from the open descriptor, lies under ``root``; else :class:`ImageError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError("not_a_file", path, "no such file" if not path.is_symlink()
                         else f"dangling symlink to {os.readlink(path)}") from None
    except PermissionError as err:
        raise ImageError("unreadable", path, f"cannot read: {err.strerror}") from None
    except OSError as err:  # ELOOP: a symlink loop; ENXIO: a socket
        raise ImageError("broken_link" if err.errno == errno.ELOOP else "not_a_file", path,
                         f"cannot open: {err.strerror}") from None
    try:
        if root is not None:
            link = f"/proc/self/fd/{fd}"
            real = Path(os.readlink(link) if os.path.islink(link) else os.path.realpath(path))
            if not real.is_relative_to(Path(root).resolve()):
                raise ImageError("outside_root", path, f"opens {real}, outside {root}; not read")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not_a_file", path, "not a regular file (a folder, fifo, socket or device)")
        if info.st_size == 0:
            raise ImageError("empty", path, "empty file (0 bytes)")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


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


# ------------------------------------------------ the prepared dataset's pixels column
def pixels_to_u8(pixels: Sequence[bytes] | np.ndarray, resolution: int) -> np.ndarray:
    """Rows of the ``pixels`` column (R*R*3 uint8 bytes each) -> (n, R, R, 3) uint8 (writable)."""
    if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8:
        return pixels.reshape(-1, resolution, resolution, 3).copy()
    return np.frombuffer(b"".join(pixels), np.uint8).reshape(-1, resolution, resolution, 3).copy()


def pixels_to_tensor(pixels: Sequence[bytes] | np.ndarray, resolution: int) -> torch.Tensor:
    """Rows of the ``pixels`` column -> (n, 3, R, R) float32 in [-1, 1]: the per-batch
    conversion, the same arithmetic as :func:`to_tensor`."""
    return _u8_to_tensor(pixels_to_u8(pixels, resolution))
