"""The one adapter that knows the diffusers classes: ``Denoiser`` over a ``UNet2DModel``.

Downstream code only calls ``eps = denoiser(x_t, t)`` and reads ``denoiser.schedule``.
Loading resolves a hub id or a local folder exactly as diffusers does; the ``tiny`` profile's
trained backbone is saved with ``save_pretrained`` in the same layout, so every later stage loads
it like a downloaded model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from hfedit.config import BackboneConfig, SchedulerConfig, UNetConfig
from hfedit.device import Precision, autocast
from hfedit.diffusion.schedule import Schedule


class BackboneUnavailable(RuntimeError):
    """The configured backbone cannot be loaded here (offline, missing folder, wrong format)."""


class Denoiser(nn.Module):
    """``eps = denoiser(x_t, t)``: a frozen noise-prediction network plus its schedule.

    ``x_t``: (B, C, H, W) in the model's range ([-1, 1]); ``t``: an int or a (B,) tensor.
    ``precision``: the U-Net runs under autocast with that dtype (hfedit.device); ``eps`` is
    returned in the input's dtype (float32), so everything computed from it (maps, losses)
    stays float32.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, source: str = "", scheduler=None,
                 precision: Precision | str = Precision.fp32) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.source = source
        self.scheduler = scheduler  # the diffusers scheduler, saved beside the UNet
        self.precision = Precision(precision)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def autocast(self):
        """The autocast context of this denoiser's precision on its device."""
        return autocast(self.device, self.precision)

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def forward(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x_t.shape[0])
        with self.autocast():
            eps = self.unet(x_t, t).sample
        return eps.to(x_t.dtype)  # float32 (the input's dtype) whatever the autocast

    def freeze(self) -> "Denoiser":
        self.eval()
        self.requires_grad_(False)
        return self


# ------------------------------------------------------------------------------- building
def build_unet(cfg: UNetConfig, resolution: int, channels: int = 3) -> nn.Module:
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    if not (len(cfg.down_block_types) == len(cfg.up_block_types) == n):
        raise ValueError(
            "backbone.unet: block_out_channels, down_block_types and up_block_types must have "
            f"the same length (got {n}, {len(cfg.down_block_types)}, {len(cfg.up_block_types)})"
        )
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=None,
    )


def build_scheduler(cfg: SchedulerConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule.value,
        clip_sample=False,
        prediction_type="epsilon",
    )


def schedule_from_scheduler(scheduler) -> Schedule:
    """Our float64 ``Schedule`` from any diffusers DDPM/DDIM scheduler (public config only)."""
    betas = scheduler.betas.to(torch.float64)
    set_alpha_to_one = scheduler.config.get("set_alpha_to_one", True)
    # DDPMScheduler has no such flag: its step after t=0 uses alpha 1.0.
    return Schedule.from_betas(betas, 1.0 if set_alpha_to_one else None)


def new_denoiser(cfg: BackboneConfig, resolution: int) -> Denoiser:
    """A freshly initialised backbone of the configured architecture (random weights)."""
    scheduler = build_scheduler(cfg.scheduler)
    return Denoiser(build_unet(cfg.unet, resolution), schedule_from_scheduler(scheduler), "new", scheduler)


# ------------------------------------------------------------------------- save and load
def save_backbone(denoiser: Denoiser, folder: str | Path, meta: dict | None = None) -> None:
    """Write the diffusers pipeline layout (``model_index.json``, ``unet/``, ``scheduler/``)."""
    from diffusers import DDPMPipeline

    if denoiser.scheduler is None:
        raise ValueError("save_backbone: the denoiser carries no diffusers scheduler to save")
    folder = Path(folder)
    DDPMPipeline(unet=denoiser.unet, scheduler=denoiser.scheduler).save_pretrained(folder)
    from hfedit.files import plain_modes

    plain_modes(folder)  # safetensors writes 0600
    if meta is not None:
        from hfedit.files import atomic_write_json

        atomic_write_json(folder / "hfedit.json", meta)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_backbone(source: str | Path, device: str | torch.device = "cpu",
                  precision: Precision | str = Precision.fp32) -> Denoiser:
    """Load a UNet2DModel and its scheduler from a local folder or a hub id, onto ``device``,
    running at ``precision`` (:class:`Denoiser`).

    Accepts the pipeline layout (``unet/`` + ``scheduler/``) and the flat layout
    (``config.json`` + ``scheduler_config.json`` side by side), local or on the hub.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    source = str(source)
    local = Path(source)
    is_local = local.exists()
    if not is_local and (source.startswith((".", "/")) or source.count("/") != 1):
        raise BackboneUnavailable(
            f"backbone.source='{source}': no such folder, and it is not a hub id of the form "
            "'owner/name'. Set backbone.source to a folder written by the backbone stage "
            "(models/backbone), a diffusers UNet2DModel hub id, or 'train'."
        )
    errors = []
    for sub in ("unet", None):
        try:
            kwargs = {"subfolder": sub} if sub else {}
            unet = UNet2DModel.from_pretrained(source, **kwargs)
            sched_kwargs = {"subfolder": "scheduler"} if sub else {}
            scheduler = DDPMScheduler.from_pretrained(source, **sched_kwargs)
            break
        except Exception as err:  # diffusers raises OSError/EnvironmentError/ValueError
            errors.append(f"{type(err).__name__}: {err}")
    else:
        hint = (
            "This machine is offline (HF_HUB_OFFLINE=1 or no network): download the model "
            "elsewhere and set backbone.source to its local folder, or use the 'tiny' profile "
            "(backbone.source=train)."
            if not is_local
            else "The folder must hold a diffusers UNet2DModel and a scheduler config."
        )
        raise BackboneUnavailable(
            f"backbone.source='{source}' could not be loaded. {hint}\n  " + "\n  ".join(errors[-1:])
        )
    if scheduler.config.prediction_type != "epsilon":
        raise BackboneUnavailable(
            f"backbone.source='{source}': prediction_type={scheduler.config.prediction_type!r}; "
            "hfedit needs an epsilon-prediction model."
        )
    schedule = schedule_from_scheduler(scheduler)
    return Denoiser(_aligned(unet.to(device)), schedule, source, scheduler, precision).freeze()


def _aligned(module: nn.Module, alignment: int = 64) -> nn.Module:
    """Give every CPU parameter and buffer of ``module`` memory of its own, ``alignment``-byte
    aligned. ``from_pretrained`` leaves the tensors at arbitrary offsets of the file's buffer,
    and oneDNN picks other kernels for unaligned weights, which round differently: without the
    copy a loaded backbone's ``eps`` differs from that of the same weights in fresh memory in
    the last digits, enough to flip 8-bit pixels of an edit, so the same image and seed would
    give other PNGs from a served model than from the library. Copied, the two are bit for bit
    the same (tests/test_backbone.py checks it)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "cpu" and t.data_ptr() % alignment:
            t.data = t.data.clone()
    return module


def describe(denoiser: Denoiser) -> dict:
    n_params = sum(p.numel() for p in denoiser.unet.parameters())
    return {
        "source": denoiser.source,
        "sample_size": denoiser.sample_size,
        "parameters": n_params,
        "num_train_timesteps": denoiser.schedule.num_train_timesteps,
    }


