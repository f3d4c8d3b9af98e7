"""The front door for a notebook or a script: PIL images in, edited PIL images out.

:class:`HFEditPipeline` holds a frozen backbone, the edit rectifiers of some attributes and the
inversion settings; calling it inverts every image once and replays it through each requested
attribute's rectifier (:class:`hfedit.editing.editor.Editor`, the same code path as the CLI, the
Ray batch job and the served model, so the same image, settings, seed and thread count give the
same pixels). ``from_pretrained`` reads the pipeline's ``models/`` folder (``backbone/``,
``edits/<attribute>/``, optionally ``rectifier/``), a folder written by :meth:`save_pretrained`,
a lone backbone folder or a diffusers hub id. A registered model (``models:/name@alias``) loads
through ``pipelines.serving.load_pipeline(uri)``, which fetches it into that layout first (the
library never imports mlflow).

Images are prepared as the ``prepare`` stage prepares them (EXIF orientation, mode conversion,
centre crop, resize to the backbone's resolution), so outputs are at that resolution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from hfedit.config import InversionConfig, load_config, to_flat_dict
from hfedit.data.images import load_image, to_pil, to_rgb, to_tensor
from hfedit.editing.editor import RECONSTRUCTION, Editor, load_edit_rectifiers
from hfedit.evaluation import metrics as M
from hfedit.models.backbone import load_backbone, save_backbone
from hfedit.models.checkpoint import load_rectifier, save_rectifier

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]
PIPELINE_FILE = "hfedit_pipeline.json"  # written by save_pretrained: the inversion settings
MAX_PIXELS = 10**8  # largest image a path may hold (as data.max_pixels: decoded before resizing)


@dataclass
class EditOutput:
    """``images[name]``: one PIL image per input for each requested name (an attribute, or
    ``reconstruction``); ``source``: the inputs as the model saw them (cropped and resized);
    ``metrics[name]``: per image ``l1`` (mean absolute difference on [0, 1]), ``ssim`` and
    ``psnr`` (dB) of the output against its source."""

    images: dict[str, list[Image.Image]]
    source: list[Image.Image]
    metrics: dict[str, dict[str, list[float]]] = field(default_factory=dict)


class HFEditPipeline:
    """A frozen backbone, edit rectifiers per attribute, and inversion settings."""

    def __init__(self, editor: Editor, source: str = "") -> None:
        self.editor = editor
        self.source = source

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike] = "models",
                        attributes: Optional[Sequence[str]] = None,
                        inversion: Optional[InversionConfig] = None,
                        device: Union[str, torch.device] = "cpu",
                        precision: str = "fp32") -> "HFEditPipeline":
        """Load from a pipeline folder (``backbone/`` + ``edits/<attribute>/`` [+
        ``rectifier/``]), a backbone folder or a hub id (then only ``reconstruction``).
        ``attributes``: which edit rectifiers to load (all found when None). ``inversion``:
        the settings; by default the folder's ``hfedit_pipeline.json``, else the project's
        params.yaml (:func:`hfedit.config.load_config`), as the CLI uses."""
        root = Path(path)
        backbone = root / "backbone" if (root / "backbone").is_dir() else path
        denoiser = load_backbone(backbone, device=device, precision=precision)
        edits = root / "edits"
        rectifiers = {}
        if edits.is_dir() and (attributes is None or attributes):
            rectifiers = load_edit_rectifiers(edits, denoiser.unet, attributes, device=device)
        elif attributes:
            raise KeyError(f"{path}: no edits/ folder with the attributes {list(attributes)}; "
                           "give the pipeline's models/ folder (train_edits writes models/edits)")
        recon = None
        if (root / "rectifier" / "rectifier.json").is_file():
            recon, _ = load_rectifier(root / "rectifier", denoiser.unet, device=str(device))
        if inversion is None:
            inversion = _saved_inversion(root) or load_config().inversion
        return cls(Editor(denoiser, inversion, rectifiers, recon), source=str(path))

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> Path:
        """Write a self-contained folder :meth:`from_pretrained` reads: ``backbone/``,
        ``edits/<attribute>/`` (each rectifier whole: no shared trunk to keep beside it),
        ``rectifier/`` when there is a reconstruction rectifier, ``hfedit_pipeline.json``."""
        from hfedit.files import atomic_write_json

        out = Path(folder)
        save_backbone(self.editor.denoiser, out / "backbone")
        for name, rect in self.editor.rectifiers.items():
            save_rectifier(out / "edits" / name, rect, {"attribute": name})
        if self.editor.reconstruction_rectifier is not None:
            save_rectifier(out / "rectifier", self.editor.reconstruction_rectifier)
        atomic_write_json(out / PIPELINE_FILE,
                          {"inversion": to_flat_dict(self.editor.cfg), "source": self.source})
        return out

    def to(self, device: Union[str, torch.device]) -> "HFEditPipeline":
        """Move the backbone and every rectifier to ``device``."""
        self.editor.denoiser.to(device)
        for rect in self.editor.rectifiers.values():
            rect.to(device)
        if self.editor.reconstruction_rectifier is not None:
            self.editor.reconstruction_rectifier.to(device)
        return self

    # ------------------------------------------------------------------------------ editing
    @property
    def attributes(self) -> list[str]:
        """The attributes this pipeline can edit (besides ``reconstruction``)."""
        return self.editor.attributes

    @property
    def resolution(self) -> int:
        return self.editor.denoiser.sample_size

    def prepare(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """The images as a (B, 3, R, R) tensor in [-1, 1] on the backbone's device."""
        items = [images] if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)) else images
        tensors = [to_tensor(_rgb(item), self.resolution) for item in items]
        return torch.stack(tensors).to(self.editor.denoiser.device)

    @torch.no_grad()
    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]],
                 attributes: Union[str, Sequence[str]] = (RECONSTRUCTION,),
                 num_steps: Optional[int] = None, skip: Optional[int] = None,
                 seed: Optional[int] = None, eta: Optional[float] = None) -> EditOutput:
        """Invert the images once and replay them for each name of ``attributes`` (an attribute
        this pipeline has, or ``reconstruction``). ``num_steps``, ``skip``, ``eta``, ``seed``
        default to the pipeline's inversion settings; image i gets seed ``seed + i``."""
        names = [attributes] if isinstance(attributes, str) else list(attributes)
        unknown = [n for n in names if n != RECONSTRUCTION and n not in self.attributes]
        if unknown:
            raise KeyError(f"no edit rectifier for {unknown} (have: {self.attributes}); load "
                           "them with HFEditPipeline.from_pretrained(..., attributes=...)")
        x0 = self.prepare(images)
        cfg = self.editor.cfg
        settings = {k: v for k, v in (("num_steps", num_steps), ("skip", skip), ("eta", eta),
                                      ("seed", seed)) if v is not None}
        if settings:
            cfg = _replaced(cfg, settings)
        editor = Editor(self.editor.denoiser, cfg, self.editor.rectifiers,
                        self.editor.reconstruction_rectifier)
        seeds = [cfg.seed + i for i in range(x0.shape[0])]
        # The attributes' replay runs right after the inversion, as in the CLI, and the
        # backbone's replay after it: on the CPU an edit's last float bits can depend on what ran
        # before it in the process (the plain replay first moved 4-5 pixels of a 2-image edit by
        # one 8-bit level), so this order gives the CLI's pixels whether or not the
        # reconstruction is asked for too.
        inv = editor.invert(x0, seeds)
        outputs = {}
        attrs = [n for n in names if n != RECONSTRUCTION]
        if attrs:
            outputs.update(editor.edit(x0, seeds, names=attrs, inversion=inv).outputs)
        if RECONSTRUCTION in names:
            outputs.update(editor.edit(x0, seeds, names=[RECONSTRUCTION], inversion=inv).outputs)
        out = EditOutput(images={}, source=[to_pil(x) for x in x0])
        for name in names:
            result = outputs[name].clamp(-1, 1)
            out.images[name] = [to_pil(x) for x in result]
            out.metrics[name] = {key: fn(x0, result).tolist() for key, fn in
                                 (("l1", M.l1), ("ssim", M.ssim), ("psnr", M.psnr))}
        return out

    def __repr__(self) -> str:
        return (f"HFEditPipeline(source={self.source!r}, resolution={self.resolution}, "
                f"attributes={self.attributes}, num_steps={self.editor.cfg.num_steps})")


def _rgb(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        array = item if item.dtype == np.uint8 else np.clip(np.round(item * 255), 0, 255).astype(np.uint8)
        return to_rgb(Image.fromarray(array))
    return load_image(item, MAX_PIXELS).image


def _saved_inversion(root: Path) -> Optional[InversionConfig]:
    path = root / PIPELINE_FILE
    if not path.is_file():
        return None
    return _replaced(InversionConfig(), json.loads(path.read_text())["inversion"])


def _replaced(cfg: InversionConfig, values: dict) -> InversionConfig:
    """``cfg`` with ``values`` (dot-list keys of InversionConfig), validated by the schema."""
    from omegaconf import OmegaConf

    from hfedit.config import ConfigError, HfeditConfig
    from hfedit.validation import check_config

    merged = OmegaConf.merge(OmegaConf.structured(cfg),
                             OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]))
    typed: InversionConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check_config(HfeditConfig(inversion=typed), ConfigError)  # N >= 1, 0 <= skip < N, eta >= 0
    return typed


__all__ = ["EditOutput", "HFEditPipeline"]
