"""hfedit: high-fidelity editing of real images with a pretrained diffusion model.

Edit-friendly DDPM inversion (noise maps that replay an image exactly) joined with the
rectifier (a hypernetwork that modulates the frozen U-Net's conv kernels per image and per
step, trained per attribute with a directional CLIP loss).

The front door, PIL images in and out (:class:`~hfedit.pipeline.HFEditPipeline`)::

    import hfedit

    pipe = hfedit.HFEditPipeline.from_pretrained("models")       # the pipeline's models/ folder
    out = pipe("face.png", attributes=["reconstruction", "smiling"], seed=0)
    out.images["smiling"][0].save("face_smiling.png")            # out.metrics: l1, ssim, psnr

The building blocks underneath (imported on first use, so ``import hfedit`` stays cheap)::

    cfg = hfedit.load_config()                                  # params.yaml + profile
    denoiser = hfedit.load_backbone("models/backbone")          # folder or hub id
    photo = hfedit.load_image("face.png", max_pixels=10**8).image  # PIL, RGB, EXIF-rotated
    image = hfedit.to_tensor(photo, resolution=32)[None]        # (1, 3, 32, 32) in [-1, 1]
    inv = hfedit.invert(denoiser, denoiser.schedule, image, num_steps=50)
    assert (hfedit.replay(denoiser, denoiser.schedule, inv) - image).abs().max() < 1e-4

    editor = hfedit.load_editor("models/backbone", cfg.inversion, edits_dir="models/edits")
    edited = editor.edit(image, seeds=[0], names=["smiling"]).outputs["smiling"]

Subpackages, by concern: :mod:`hfedit.diffusion` (schedule, inversion, sampling),
:mod:`hfedit.models` (backbone adapter, rectifier, modulation, CLIP, checkpoints),
:mod:`hfedit.editing` (Editor), :mod:`hfedit.training`, :mod:`hfedit.evaluation`,
:mod:`hfedit.data`; :mod:`hfedit.config` is the typed config. The library never imports ray,
mlflow or dvc (those live in ``pipelines/`` and ``stages/``).
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_API = {
    "HFEditPipeline": "hfedit.pipeline",
    "EditOutput": "hfedit.pipeline",
    "load_config": "hfedit.config",
    "HfeditConfig": "hfedit.config",
    "Denoiser": "hfedit.models.backbone",
    "load_backbone": "hfedit.models.backbone",
    "Rectifier": "hfedit.models.rectifier",
    "load_rectifier": "hfedit.models.checkpoint",
    "invert": "hfedit.diffusion.inversion",
    "replay": "hfedit.diffusion.inversion",
    "InversionResult": "hfedit.diffusion.inversion",
    "ddim_invert": "hfedit.diffusion.inversion",
    "ddim_sample": "hfedit.diffusion.inversion",
    "sdedit": "hfedit.diffusion.sampling",
    "Editor": "hfedit.editing.editor",
    "load_editor": "hfedit.editing.editor",
    "load_image": "hfedit.data.images",
    "to_tensor": "hfedit.data.images",
    "to_pil": "hfedit.data.images",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'hfedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
