"""Reconstruction training of the rectifier (paper eq. 3 and appendix C), as plain step functions.

One step: ``x0 ~ data``, ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (q(x_t | x0)), then the rectified step
(plain pass for ``P_t``, hypernetwork, modulated pass) and one of the losses:

* ``noise`` (the paper's choice, eq. 3): ``||eps - eps_theta_hat(x_t, t)||^2``;
* ``l1``: ``|P_t[eps_theta_hat] - x0|`` on the image;
* ``l1_dw``: ``l1`` plus ``dw_weight * mean(Delta^2)`` (the "delta-weight" penalty).

The backbone stays frozen; only rectifier parameters receive gradients. Ray Train wraps these
functions (``pipelines/pretrain_rectifier.py``); nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfedit.config import ReconLossKind
from hfedit.models.rectifier import ModulatedDenoiser, RectifiedStep
from hfedit.diffusion.schedule import predict_x0, q_sample


@dataclass(frozen=True)
class StepStats:
    loss: float
    noise_mse: float  # ||eps - eps_hat||^2, the posterior-gap estimate, whatever the loss
    plain_noise_mse: float  # the same for the unmodulated backbone
    delta_rms: float  # root-mean-square of the kernel offsets


def delta_penalty(step: RectifiedStep) -> Tensor:
    """Mean squared offset ``mean(Delta^2)`` over every target kernel and the batch."""
    terms = [f.delta().pow(2).mean() for f in step.factors.values()]
    return torch.stack(terms).mean()


def reconstruction_loss(kind: ReconLossKind | str, step: RectifiedStep, eps: Tensor,
                        x_t: Tensor, t: Tensor, x0: Tensor, schedule,
                        dw_weight: float = 0.1) -> Tensor:
    """The loss ``kind`` (module docstring) of one rectified step, a scalar mean over the batch:
    ``eps``, ``x_t``, ``x0`` (B, C, H, W) and ``t`` (B,) are the step's inputs."""
    kind = ReconLossKind(kind)
    if kind is ReconLossKind.noise:
        return F.mse_loss(step.eps_hat, eps)
    x0_hat = predict_x0(schedule, x_t, t, step.eps_hat)
    loss = F.l1_loss(x0_hat, x0)
    if kind is ReconLossKind.l1_dw:
        loss = loss + dw_weight * delta_penalty(step)
    return loss


def sample_training_inputs(x0: Tensor, num_train_timesteps: int, generator: torch.Generator):
    """``t ~ U{0..T-1}`` per image and ``eps ~ N(0, I)``: (t (B,), eps (B, C, H, W))."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    return t.to(x0.device), eps.to(x0.device)


class ReconstructionObjective(nn.Module):
    """``forward(x0, t, eps) -> (loss, RectifiedStep)``: the whole rectified step and its loss as
    one module, so data-parallel wrappers (DDP) see the rectifier's parameters in one forward.
    The backbone inside is frozen, so only rectifier parameters are trainable here."""

    def __init__(self, model: ModulatedDenoiser, kind: ReconLossKind | str = ReconLossKind.noise,
                 dw_weight: float = 0.1) -> None:
        super().__init__()
        self.model, self.kind, self.dw_weight = model, ReconLossKind(kind), dw_weight

    def forward(self, x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, RectifiedStep]:
        schedule = self.model.schedule
        x_t = q_sample(schedule, x0, t, eps)
        step = self.model.step(x_t, t, x0)
        loss = reconstruction_loss(self.kind, step, eps, x_t, t, x0, schedule, self.dw_weight)
        return loss, step


def reconstruction_step(objective: nn.Module, optimizer: torch.optim.Optimizer, x0: Tensor,
                        generator: torch.Generator, num_train_timesteps: int) -> StepStats:
    """One optimisation step of the rectifier on a batch ``x0`` (B, C, H, W) in [-1, 1].

    ``objective`` is a :class:`ReconstructionObjective`, possibly wrapped (DDP averages the
    gradients across workers during ``backward``)."""
    t, eps = sample_training_inputs(x0, num_train_timesteps, generator)
    loss, step = objective(x0, t, eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return StepStats(
            loss=loss.item(),
            noise_mse=F.mse_loss(step.eps_hat, eps).item(),
            plain_noise_mse=F.mse_loss(step.eps_plain, eps).item(),
            delta_rms=delta_penalty(step).sqrt().item(),
        )


def make_optimizer(rectifier: torch.nn.Module, lr: float, weight_decay: float,
                   decay_every: int, decay_factor: float):
    """Adam (lr 1e-3, weight decay 1e-5 in the paper) and a step decay (x0.9 every 5000)."""
    trainable = [p for p in rectifier.parameters() if p.requires_grad]  # frozen: shared trunk
    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=decay_every, gamma=decay_factor)
    return opt, sched
