"""Damaged JPEGs: what each check catches, and how wrong the pixels of what it lets through are.

Checks compared on the same files:
  * ``walk``: hfedit's hand-written walk of the compressed data (``hfedit.data.jpeg._walk``;
    sequential JPEG only, returns early for progressive);
  * ``strict``: libjpeg-turbo with warnings as errors (``simplejpeg.decode_jpeg(strict=True)``);
  * ``hfedit``: :func:`hfedit.data.jpeg.check_jpeg`, which runs both;
  * ``pillow``: Pillow's own decode (``Image.load()``), which drops libjpeg's warnings.

Files: scikit-image's astronaut at 256 and 512 px, sequential and progressive (quality 90), each
damaged by zeroing 16, 64 or 256 bytes at 12 positions spread over the compressed data, and by
truncation at 4 points. For each check: the share of damaged files refused, and over the files it
accepts, the mean absolute error (of 255) of their decode against the undamaged image.

    .venv/bin/python benchmarks/jpeg_strict.py
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image


def _variants(data: bytes):
    sos = data.find(b"\xff\xda")  # the first scan; the entropy-coded data follows its header
    start, end = sos + 12, len(data) - 2
    for width in (16, 64, 256):
        for k in range(12):
            at = start + (end - start - width) * (k + 1) // 13
            yield f"zero{width}", data[:at] + bytes(width) + data[at + width:]
    for frac in (0.3, 0.6, 0.9, 0.99):
        yield "truncated", data[:int(len(data) * frac)]


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def main() -> int:
    import simplejpeg
    from skimage import data as skdata

    from hfedit.data.jpeg import JpegDataError, _walk, check_jpeg

    def walk_check(b):
        try:
            _walk(b)
        except JpegDataError:
            return False
        return True

    def hfedit_check(b):
        try:
            check_jpeg(b)
        except JpegDataError:
            return False
        return True

    def strict_check(b):
        try:
            simplejpeg.decode_jpeg(b, strict=True)
        except ValueError:
            return False
        return True

    def pillow_check(b):
        try:
            _pillow(b)
        except Exception:
            return False
        return True

    checks = {"walk": walk_check, "strict": strict_check, "hfedit": hfedit_check,
              "pillow": pillow_check}
    rows = []
    for size in (256, 512):
        base = Image.fromarray(skdata.astronaut()).resize((size, size))
        for progressive in (False, True):
            buf = io.BytesIO()
            base.save(buf, "JPEG", quality=90, progressive=progressive)
            clean = buf.getvalue()
            truth = _pillow(clean).astype(float)
            for kind, damaged in _variants(clean):
                accepted = {name: fn(damaged) for name, fn in checks.items()}
                try:
                    err = float(np.abs(_pillow(damaged).astype(float) - truth).mean())
                except Exception:
                    err = float("nan")
                rows.append((size, "progressive" if progressive else "sequential", kind,
                             accepted, err))
    print("| JPEG | damage | files | refused: walk | strict | hfedit (both) | pillow | "
          "mean error let through (of 255): walk | strict | hfedit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("sequential", "progressive"):
        for kind in ("zero16", "zero64", "zero256", "truncated"):
            sel = [r for r in rows if r[1] == mode and r[2] == kind]
            refused = {n: sum(not r[3][n] for r in sel) for n in checks}
            through = {n: [r[4] for r in sel if r[3][n] and r[4] == r[4]]
                       for n in ("walk", "strict", "hfedit")}
            mean = {n: (f"{np.mean(v):.1f} ({len(v)})" if v else "-") for n, v in through.items()}
            print(f"| {mode} | {kind} | {len(sel)} | {refused['walk']} | {refused['strict']} | "
                  f"{refused['hfedit']} | {refused['pillow']} | {mean['walk']} | "
                  f"{mean['strict']} | {mean['hfedit']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
