"""The networks and their files: the one adapter over diffusers' ``UNet2DModel``
(:class:`~hfedit.models.backbone.Denoiser`), the rectifier hypernetwork, the per-sample
modulation of a frozen U-Net's conv kernels, CLIP and the directional loss, and the
self-describing safetensors + JSON checkpoints they are saved in. Imports torch, diffusers,
open_clip and :mod:`hfedit.diffusion`; never ray, mlflow or dvc.
"""
