"""Train the ``tiny`` profile's DDPM backbone on the prepared images (the offline default).

Standard DDPM training (Ho et al. 2020): ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``, loss ``||eps - eps_theta(x_t, t)||^2``, with an
exponential moving average of the weights (the EMA is what gets saved, like
``google/ddpm-ema-*``). Checkpoints every ``checkpoint_every`` steps; a rerun with the same
config and data resumes from the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hfedit.models.backbone import Denoiser, build_scheduler, build_unet, schedule_from_scheduler
from hfedit.models.checkpoint import (
    fingerprint,
    flatten_optimizer,
    has_checkpoint,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unflatten_optimizer,
)
from hfedit.config import BackboneConfig, to_flat_dict
from hfedit.progress import progress
from hfedit.data.prepared import Split
from hfedit.diffusion.sampling import ddpm_sample
from hfedit.diffusion.schedule import q_sample

# log(metrics, step) — the tracking edge (MLflow) plugs in here.
LogFn = Optional[Callable[[dict[str, float], int], None]]
CKPT = "train_state"


@dataclass
class BackboneTrainResult:
    denoiser: Denoiser  # EMA weights, frozen, with its diffusers scheduler
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0


def _lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    progress = min(1.0, step / max(1, cfg.steps))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_backbone(
    cfg: BackboneConfig,
    images: "Tensor | Split",
    checkpoint_dir: str | Path,
    log: LogFn = None,
    show_progress: bool = True,
    device: str | torch.device = "cpu",
) -> BackboneTrainResult:
    """Train a UNet2DModel on ``images`` (N, 3, R, R) in [-1, 1]: a tensor, or a prepared split
    (:class:`hfedit.data.prepared.Split`) from which each step reads only its batch. Resumes from
    ``checkpoint_dir`` when it holds a checkpoint of the same config and data. The networks live
    on ``device``; the images stay where they are and each batch is moved once; every random draw comes from a
    CPU generator, so a run is the same draws on every device."""
    if len(images.shape) != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty (N, C, H, W) image tensor, got {tuple(images.shape)}")
    tc = cfg.train
    resolution = int(images.shape[-1])
    torch.manual_seed(tc.seed)
    unet = build_unet(cfg.unet, resolution, channels=images.shape[1]).to(device)
    ema = build_unet(cfg.unet, resolution, channels=images.shape[1]).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = build_scheduler(cfg.scheduler)
    schedule = schedule_from_scheduler(scheduler)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(tc.seed)

    data_id = fingerprint([list(images.shape), images.data.digest if isinstance(images, Split)
                           else float(images.double().sum())])
    run_id = fingerprint({"cfg": to_flat_dict(cfg), "data": data_id})
    start, losses = 0, []
    ckpt_dir = Path(checkpoint_dir)
    if has_checkpoint(ckpt_dir, CKPT):
        ck = load_checkpoint(ckpt_dir, CKPT)
        if ck.meta.get("run_id") == run_id:
            unet.load_state_dict(prefixed(ck.tensors, "unet."))  # copies onto unet's device
            ema.load_state_dict(prefixed(ck.tensors, "ema."))
            opt.load_state_dict(unflatten_optimizer(ck.tensors, ck.meta["optim"]))
            gen.set_state(ck.tensors["rng"])
            start, losses = int(ck.meta["step"]), [tuple(x) for x in ck.meta["losses"]]

    def save(step: int) -> None:
        opt_tensors, opt_meta = flatten_optimizer(opt.state_dict())
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        tensors.update(opt_tensors)
        tensors["rng"] = gen.get_state()
        meta = {"run_id": run_id, "step": step, "optim": opt_meta, "losses": losses}
        save_checkpoint(ckpt_dir, CKPT, tensors, meta)

    unet.train()
    n = images.shape[0]
    bar = progress(total=tc.steps, initial=start, desc="backbone", unit="step",
                   disable=not show_progress)
    running = 0.0
    for step in range(start, tc.steps):
        idx = torch.randint(0, n, (tc.batch_size,), generator=gen)
        x0 = images[idx]
        if tc.hflip:
            flip = torch.rand(tc.batch_size, generator=gen) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        t = torch.randint(0, schedule.num_train_timesteps, (tc.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        loss = F.mse_loss(unet(q_sample(schedule, x0, t, eps), t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - tc.ema_decay)
        running += loss.item()
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            mean = running / (tc.log_every if done % tc.log_every == 0 else done % tc.log_every)
            running = 0.0
            losses.append((done, mean))
            bar.set_postfix(loss=f"{mean:.4f}")
            if log is not None:
                log({"backbone/loss": mean, "backbone/lr": _lr_at(step, tc)}, done)
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            save(done)
        bar.update(1)
    bar.close()
    denoiser = Denoiser(ema.eval(), schedule, "train", scheduler).freeze()
    return BackboneTrainResult(denoiser, losses, resumed_from=start)


def sample_grid(denoiser: Denoiser, num: int, num_steps: int, seed: int = 0) -> Tensor:
    """``num`` DDPM samples (num, C, R, R) in [-1, 1] from pure noise."""
    shape = (num, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size)
    gen = torch.Generator().manual_seed(seed)
    return ddpm_sample(denoiser, denoiser.schedule, shape, num_steps, generator=gen,
                       device=denoiser.device).clamp(-1, 1)


__all__ = ["BackboneTrainResult", "train_backbone", "sample_grid"]
