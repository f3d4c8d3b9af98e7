"""Stand-ins for tests and benchmarks: google/ddpm-ema-celebahq-256's architecture and
scheduler with random weights (the paper's shapes, memory and speed, offline). Nothing in the
pipeline imports this module.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hfedit.models.backbone import Denoiser, schedule_from_scheduler


# --------------------------------------------------------- the paper's backbone, as a stand-in
# google/ddpm-ema-celebahq-256 (the paper's backbone, 113.7M parameters): the UNet2DModel
# config.json and scheduler_config.json of its hub repo. A random-weight model of this exact
# architecture, in the repo's flat layout, lets the paper's setting run offline end to end
# (shapes, memory and speed are those of the real model; the images are not).
CELEBAHQ256_UNET = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    attention_head_dim=None, act_fn="silu", center_input_sample=False,
    mid_block_scale_factor=1, time_embedding_type="positional",
)
CELEBAHQ256_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                             beta_schedule="linear", clip_sample=True, variance_type="fixed_small")


def celebahq256_unet(seed: int = 0, **overrides) -> nn.Module:
    """A random-weight UNet2DModel of google/ddpm-ema-celebahq-256's architecture (seeded)."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**{**CELEBAHQ256_UNET, **overrides})


def celebahq256_denoiser(seed: int = 0, device: str | torch.device = "cpu",
                         **overrides) -> Denoiser:
    """The stand-in (:func:`celebahq256_unet`) with the real model's scheduler, frozen, on
    ``device``: what the benchmarks time (``overrides``: e.g. ``sample_size``)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**CELEBAHQ256_SCHEDULER)
    return Denoiser(celebahq256_unet(seed, **overrides).to(device),
                    schedule_from_scheduler(scheduler), "celebahq256-standin", scheduler).freeze()


def write_celebahq256_standin(folder: str | Path, seed: int = 0) -> Path:
    """The stand-in in the hub repo's flat layout (``config.json``,
    ``diffusion_pytorch_model.safetensors``, ``scheduler_config.json`` side by side): a folder
    ``backbone.source`` accepts exactly as it accepts a downloaded copy of the real model."""
    from diffusers import DDPMScheduler

    celebahq256_unet(seed).save_pretrained(folder)
    DDPMScheduler(**CELEBAHQ256_SCHEDULER).save_pretrained(folder)
    from hfedit.files import plain_modes

    plain_modes(folder)
    return Path(folder)
