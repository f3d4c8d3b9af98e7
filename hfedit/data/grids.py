"""Image grids: tensors or uint8 arrays tiled into one PNG, optionally with row and
column labels (the before/after figures every stage writes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
from PIL import Image

from hfedit.data.images import tensor_to_u8
from hfedit.files import atomic_write

if TYPE_CHECKING:  # torch is imported where tensors are made: decode workers never load it
    import torch


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
