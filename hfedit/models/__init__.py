"""The networks and their files: the one adapter over diffusers' ``UNet2DModel``
(:class:`~hfedit.models.backbone.Denoiser`), the rectifier hypernetwork, the per-sample
modulation of a frozen U-Net's conv kernels, CLIP and the directional loss, and the
self-describing safetensors + JSON checkpoints they are saved in. Imports torch, torchvision,
diffusers, open_clip, safetensors and omegaconf, and of hfedit only :mod:`hfedit.config`,
:mod:`hfedit.diffusion` and the top-level modules :mod:`hfedit.device` and :mod:`hfedit.files`;
never :mod:`hfedit.editing`, :mod:`hfedit.training`, :mod:`hfedit.evaluation`,
:mod:`hfedit.data`, nor ray, mlflow or dvc.
"""
