"""Damaged files of every format hfedit reads: how many :func:`hfedit.data.images.load_image`
refuses, beside the ``integrity`` it reports for the format (``hfedit.data.images.INTEGRITY``).

Files: scikit-image's astronaut at 256 px saved as PNG, JPEG (sequential and progressive,
quality 90), WebP (lossy quality 90 and lossless), TIFF (raw, deflate, LZW), BMP and GIF; each
damaged by zeroing 64 bytes at 24 positions spread over 15-90% of the file, and by truncation at
8 points (20-97%). For the damaged files it accepts, against the undamaged image's decode
(averaged over those files): the mean and the largest absolute error (of 255) and the share of
pixels that changed: how wrong what passes is.

    .venv/bin/python benchmarks/damage_detection.py
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfedit.data.images import ImageError, load_image  # noqa: E402

FORMATS = {
    "PNG": {"format": "PNG"},
    "JPEG": {"format": "JPEG", "quality": 90},
    "JPEG progressive": {"format": "JPEG", "quality": 90, "progressive": True},
    "WebP lossy": {"format": "WEBP", "quality": 90},
    "WebP lossless": {"format": "WEBP", "lossless": True},
    "TIFF raw": {"format": "TIFF"},
    "TIFF deflate": {"format": "TIFF", "compression": "tiff_adobe_deflate"},
    "TIFF LZW": {"format": "TIFF", "compression": "tiff_lzw"},
    "BMP": {"format": "BMP"},
    "GIF": {"format": "GIF"},
}


def variants(data: bytes):
    n = len(data)
    for frac in np.linspace(0.15, 0.9, 24):
        at = int(n * frac)
        yield "zeroed", data[:at] + bytes(64) + data[at + 64:]
    for frac in np.linspace(0.2, 0.97, 8):
        yield "truncated", data[:int(n * frac)]


@contextlib.contextmanager
def quiet_stderr():
    """libtiff prints its errors to fd 2 itself: keep them out of the table."""
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main() -> None:
    from skimage import data

    source = Image.fromarray(data.astronaut()).resize((256, 256))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, quiet_stderr():
        for name, kw in FORMATS.items():
            img = source.convert("P") if kw["format"] == "GIF" else source
            buf = io.BytesIO()
            img.save(buf, **kw)
            good = buf.getvalue()
            path = Path(tmp) / f"x.{kw['format'].lower()}"
            path.write_bytes(good)
            intact = load_image(path, 10**8)
            reference = np.asarray(intact.image, dtype=np.int16)
            counts: dict[str, list[int]] = {"zeroed": [0, 0], "truncated": [0, 0]}
            errors = []
            for kind, damaged in variants(good):
                path.write_bytes(damaged)
                counts[kind][1] += 1
                try:
                    loaded = load_image(path, 10**8)
                except ImageError:
                    counts[kind][0] += 1
                    continue
                diff = np.abs(np.asarray(loaded.image, dtype=np.int16) - reference)
                errors.append((diff.mean(), diff.max(), (diff.max(axis=-1) > 0).mean()))
            rows.append((name, len(good), intact.integrity,
                         *(f"{a}/{b}" for a, b in counts.values()),
                         *((f"{np.mean([e[0] for e in errors]):.2f}",
                            f"{np.mean([e[1] for e in errors]):.0f}",
                            f"{100 * np.mean([e[2] for e in errors]):.2f}%") if errors
                           else ("-", "-", "-"))))
    head = ("format", "bytes", "integrity", "zeroed refused", "truncated refused",
            "accepted: mean abs error", "max abs error", "pixels changed")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
