"""Edit training of a rectifier per attribute (paper 2312.15707, Algorithm 1 and eq. 4-6) and the
Markovian baseline it is compared with (its Fig. 6), as plain step functions.

ALGORITHMS.md section 4. The edit rectifier ``R`` starts as a copy of the reconstruction
rectifier; the backbone and CLIP stay frozen. Both methods minimise, per image,

    L_edit = lambda_clip * L_direction(x0_edit, text_tar; x0, text_src) + lambda_recon * |x0_edit - x0|

(``L_direction``: :mod:`hfedit.models.clip`, eq. 4; the L1 is a mean over pixels in the model's
[-1, 1] range, eq. 5) and differ in where ``x0_edit`` comes from:

* **score matching** (Algorithm 1), one step from the *original* trajectory::

      x0 ~ training images, t ~ U{0..T-1}, eps ~ N(0, I)
      x_t     = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                 q(x_t | x0)
      theta~  = theta * (1 + R(x0, P_t[eps_theta(x_t)], t))           P_t of the *unmodulated* model
      x0_edit = P_t[eps_theta~(x_t)] = (x_t - sqrt(1 - abar_t) eps_theta~(x_t)) / sqrt(abar_t)

  One rectified step (two U-Net passes and the hypernetwork) per training step.

* **Markovian** (DiffusionCLIP-style): ``x_t0`` = DDIM inversion of ``x0`` to ``t0`` by the
  backbone through the levels of :func:`chain_timesteps`
  (:func:`hfedit.diffusion.inversion.ddim_invert`; once per training image, no gradients),
  then the modulated DDIM chain ``t0 -> ... -> 0 -> x0_edit`` in ``train_steps`` steps,
  gradients through every step (each step's ``x_t`` carries the previous steps' graph, so
  deviations compound: the error accumulation the paper avoids). ``train_steps`` rectified
  steps per training step.

Nothing here knows about Ray or MLflow (``pipelines/train_edits.py`` wraps it).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from hfedit.models.backbone import Denoiser
from hfedit.models.clip import ClipModel, DirectionalClipLoss, directional_loss
from hfedit.config import AttributeConfig, EditMethod, LargeT, MarkovianConfig
from hfedit.models.modulation import ConvFactors
from hfedit.models.rectifier import ModulatedDenoiser, Rectifier, rectified_step
from hfedit.diffusion.inversion import ddim_invert
from hfedit.diffusion.schedule import Schedule, posterior_mean, predict_x0, q_sample
from hfedit.training.reconstruction import make_optimizer, sample_training_inputs


# ------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class EditLossTerms:
    """Per image, (B,) each: ``total = lambda_clip * direction + lambda_recon * l1``."""

    total: Tensor
    direction: Tensor
    l1: Tensor


class EditLoss(nn.Module):
    """The edit loss of paper eq. 6 for one attribute: ``(pred, target, **ctx) -> Tensor[B]``.

    ``pred`` = edited images ``x0_edit`` (gradients flow to them), ``target`` = source images
    ``x0``; both (B, 3, H, W) in [-1, 1]. ``ctx["source_embedding"]`` (B, D) may give
    ``E_I(x0)`` precomputed (the training images are fixed, so their embeddings are computed
    once instead of once per step); otherwise it is computed here without gradients.
    """

    def __init__(self, direction: DirectionalClipLoss, lambda_clip: float = 1.0,
                 lambda_recon: float = 1.0) -> None:
        super().__init__()
        if lambda_clip < 0 or lambda_recon < 0 or lambda_clip + lambda_recon == 0:
            raise ValueError(f"lambda_clip={lambda_clip}, lambda_recon={lambda_recon}: both must be "
                             ">= 0 and not both 0")
        self.direction = direction
        self.lambda_clip, self.lambda_recon = float(lambda_clip), float(lambda_recon)

    @property
    def clip(self) -> ClipModel:
        return self.direction.clip

    @torch.no_grad()
    def source_embedding(self, x0: Tensor, batch_size: int = 32) -> Tensor:
        """``E_I(x0)``: (N, 3, H, W) -> (N, D) unit embeddings, in batches, no gradients."""
        return torch.cat([self.clip.encode_image(x0[i:i + batch_size])
                          for i in range(0, x0.shape[0], batch_size)])

    def terms(self, pred: Tensor, target: Tensor,
              source_embedding: Optional[Tensor] = None,
              clip_input: Optional[Tensor] = None) -> EditLossTerms:
        """``clip_input``: what CLIP sees instead of ``pred`` (e.g. ``pred`` clamped to
        [-1, 1]); the L1 term always sees ``pred``."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        src = source_embedding if source_embedding is not None else self.source_embedding(target)
        seen = pred if clip_input is None else clip_input
        direction = directional_loss(src.detach(), self.clip.encode_image(seen),
                                     self.direction.text_direction)  # (B,)
        l1 = (pred - target).abs().flatten(1).mean(1)  # (B,)
        return EditLossTerms(self.lambda_clip * direction + self.lambda_recon * l1, direction, l1)

    def forward(self, pred: Tensor, target: Tensor, **ctx) -> Tensor:
        return self.terms(pred, target, ctx.get("source_embedding")).total


# ------------------------------------------------------------------------------ objectives
@dataclass(frozen=True)
class EditOutput:
    """What one objective evaluation produced: the edited images (B, C, H, W), the loss terms,
    and the offsets of every rectified step it ran (one for score matching, the chain's for
    the Markovian baseline)."""

    x0_edit: Tensor
    terms: EditLossTerms
    factors: tuple[dict[str, ConvFactors], ...]


def delta_rms(factors: tuple[dict[str, ConvFactors], ...]) -> float:
    """Root-mean-square kernel offset over the steps, targets and batch."""
    with torch.no_grad():
        sq = [f.delta().pow(2).mean() for step in factors for f in step.values()]
        return math.sqrt(torch.stack(sq).mean().item()) if sq else 0.0


class ScoreMatchingObjective(nn.Module):
    """Algorithm 1 as one module: ``forward(x0, t, eps) -> (mean loss, EditOutput)``.

    ``x_t`` comes from ``x0`` (the original trajectory), never from an edited result.
    ``large_t`` (:class:`hfedit.config.LargeT`): ``none`` = the paper as written; ``clamp`` =
    CLIP sees ``x0_edit.clamp(-1, 1)``; ``weight`` = each image's loss times ``sqrt(abar_t)``;
    ``range`` acts where ``t`` is drawn (:func:`train_edit`), not here."""

    def __init__(self, model: ModulatedDenoiser, loss: EditLoss,
                 large_t: LargeT | str = LargeT.none) -> None:
        super().__init__()
        self.model, self.loss, self.large_t = model, loss, LargeT(large_t)

    def forward(self, x0: Tensor, t: Tensor, eps: Tensor,
                source_embedding: Optional[Tensor] = None) -> tuple[Tensor, EditOutput]:
        schedule = self.model.schedule
        x_t = q_sample(schedule, x0, t, eps)  # (B, C, H, W)
        step = self.model.step(x_t, t, x0)  # P_t from the unmodulated pass, then eps_theta~
        x0_edit = predict_x0(schedule, x_t, t, step.eps_hat)  # P_t[eps_theta~(x_t)]
        seen = x0_edit.clamp(-1.0, 1.0) if self.large_t is LargeT.clamp else None
        terms = self.loss.terms(x0_edit, x0, source_embedding, clip_input=seen)
        total = terms.total  # (B,)
        if self.large_t is LargeT.weight:
            abar = schedule.alphas_cumprod.to(x0.device)[t].to(total.dtype)
            total = total * abar.sqrt()
        return total.mean(), EditOutput(x0_edit, terms, (step.factors,))


def chain_timesteps(t0: int, num_steps: int) -> list[int]:
    """Descending levels ``round(linspace(t0, 0, num_steps))`` of DiffusionCLIP's chains
    (``seq_train``/``seq_inv``): ``[t0, ..., 0]``, distinct; the step after 0 reaches x0."""
    if num_steps < 1 or t0 < 0 or (num_steps > 1 and t0 < num_steps - 1):
        raise ValueError(f"t0={t0}, num_steps={num_steps}: need num_steps >= 1 and t0 >= "
                         "num_steps - 1 (distinct timesteps)")
    if num_steps == 1:
        return [t0]
    return [round(t0 * (num_steps - 1 - i) / (num_steps - 1)) for i in range(num_steps)]


class MarkovianObjective(nn.Module):
    """The DiffusionCLIP-style baseline: ``forward(x0, x_t0) -> (mean loss, EditOutput)``.

    Runs the modulated DDIM chain (eta = 0) from ``x_t0`` through ``chain_timesteps(t0,
    train_steps)`` to x0 with gradients through every step, and applies the edit loss to the
    end result. Each step's hypernetwork input ``P_t`` is the unmodulated model's estimate at
    the chain's current ``x_t``. The modulated passes recompute the U-Net's down path (no
    prefix reuse): the reused outputs come from a pass without gradients and would cut the
    gradient to earlier steps.
    """

    def __init__(self, model: ModulatedDenoiser, loss: EditLoss, t0: int, train_steps: int) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.timesteps = chain_timesteps(t0, train_steps)
        if t0 >= model.schedule.num_train_timesteps:
            raise ValueError(f"t0={t0} must be < num_train_timesteps={model.schedule.num_train_timesteps}")

    def forward(self, x0: Tensor, x_t0: Tensor,
                source_embedding: Optional[Tensor] = None) -> tuple[Tensor, EditOutput]:
        schedule = self.model.schedule
        md = self.model
        x, factors = x_t0, []
        for t, s in zip(self.timesteps, Schedule.prev_timesteps(self.timesteps)):
            step = rectified_step(md.denoiser, md.rectifier, x, t, x0, md.mode, reuse_prefix=False,
                                  checkpoint=md.checkpoint)
            x = posterior_mean(schedule.step_coefficients(t, s, 0.0), x, step.eps_hat)
            factors.append(step.factors)
        terms = self.loss.terms(x, x0, source_embedding)
        return terms.total.mean(), EditOutput(x, terms, tuple(factors))


# ------------------------------------------------------------------------------ the steps
@dataclass(frozen=True)
class EditStepStats:
    loss: float  # mean L_edit of the batch
    direction: float  # mean L_direction (0 = along the text direction, 1 = not moving)
    l1: float  # mean |x0_edit - x0| in [-1, 1] units
    delta_rms: float  # root-mean-square of the kernel offsets


def _optimise(loss: Tensor, out: EditOutput, optimizer: torch.optim.Optimizer) -> EditStepStats:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return EditStepStats(loss=loss.item(), direction=out.terms.direction.mean().item(),
                         l1=out.terms.l1.mean().item(), delta_rms=delta_rms(out.factors))


def edit_step_score_matching(objective: nn.Module, optimizer: torch.optim.Optimizer, x0: Tensor,
                             generator: torch.Generator, num_train_timesteps: int,
                             source_embedding: Optional[Tensor] = None) -> EditStepStats:
    """One Algorithm 1 step on a batch ``x0`` (B, C, H, W) in [-1, 1]: draws ``t`` and ``eps``
    from ``generator``; ``objective`` is a :class:`ScoreMatchingObjective`."""
    t, eps = sample_training_inputs(x0, num_train_timesteps, generator)
    loss, out = objective(x0, t, eps, source_embedding)
    return _optimise(loss, out, optimizer)


def edit_step_markovian(objective: nn.Module, optimizer: torch.optim.Optimizer, x0: Tensor,
                        x_t0: Tensor, source_embedding: Optional[Tensor] = None) -> EditStepStats:
    """One Markovian step on a batch ``x0`` and its DDIM latents ``x_t0`` (both (B, C, H, W));
    ``objective`` is a :class:`MarkovianObjective`."""
    loss, out = objective(x0, x_t0, source_embedding)
    return _optimise(loss, out, optimizer)


# --------------------------------------------------------------------------- the whole run
def edit_rectifier_from(reconstruction: Rectifier, share_trunk: bool = False) -> Rectifier:
    """A trainable copy of the reconstruction rectifier (which stays untouched); with
    ``share_trunk`` its trunk and time MLP stay frozen (:meth:`Rectifier.freeze_shared`)."""
    rect = copy.deepcopy(reconstruction)
    rect.requires_grad_(True)
    if share_trunk:
        rect.freeze_shared()
    return rect.train()


def select_images(images: Tensor, num_images: int, seed: int) -> Tensor:
    """``min(num_images, N)`` training images, a seeded random subset of ``images`` (N, ...)."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be >= 1")
    if images.shape[0] == 0:
        raise ValueError("no training images")
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[perm[:num_images]]


# on_step(step, stats, lr) after every optimisation step (step counts from 1)
StepCallback = Callable[[int, EditStepStats, float], None]


@dataclass
class EditTrainResult:
    rectifier: Rectifier
    history: list[EditStepStats] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the optimisation steps alone
    setup_seconds: float = 0.0  # source embeddings (+ DDIM latents for the Markovian method)
    num_images: int = 0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.history), 1)


def train_edit(cfg: AttributeConfig, denoiser: Denoiser, reconstruction: Rectifier,
               clip: ClipModel, images: Tensor, markovian: MarkovianConfig = MarkovianConfig(),
               method: Optional[EditMethod | str] = None, steps: Optional[int] = None,
               on_step: Optional[StepCallback] = None, checkpoint: bool = False,
               share_trunk: bool = False) -> EditTrainResult:
    """Train one attribute's edit rectifier from ``reconstruction`` on ``images`` (N, C, H, W).

    ``method`` and ``steps`` override ``cfg.method`` / ``cfg.steps`` (the ablation trains both
    methods at one budget). Adam without weight decay at ``cfg.lr``, multiplied by
    ``cfg.decay`` every ``cfg.decay_every`` steps; batches of ``cfg.batch_size`` drawn with
    replacement from ``min(cfg.num_images, N)`` images picked with ``cfg.seed``, which also
    seeds every ``t`` and ``eps``. Training runs on the denoiser's device and precision;
    ``checkpoint``: activation checkpointing of the modulated passes (same gradients, less
    memory: :func:`hfedit.models.rectifier.modulated_eps`). ``share_trunk``: train the per-target
    branches and heads only, the trunk stays the reconstruction rectifier's. ``cfg.large_t`` /
    ``cfg.t_max``: what score matching does about large t (:class:`hfedit.config.LargeT`).
    """
    method = EditMethod(method or cfg.method)
    steps = cfg.steps if steps is None else steps
    if steps < 1 or cfg.batch_size < 1 or cfg.decay_every < 1:
        raise ValueError(f"steps={steps}, batch_size={cfg.batch_size}, decay_every="
                         f"{cfg.decay_every}: each must be >= 1")
    device = next(denoiser.parameters()).device
    rectifier = edit_rectifier_from(reconstruction, share_trunk).to(device)
    model = ModulatedDenoiser(denoiser, rectifier, rectifier.cfg.modulation, checkpoint=checkpoint)
    loss = EditLoss(DirectionalClipLoss(clip, cfg.source, cfg.target), cfg.lambda_clip,
                    cfg.lambda_recon)
    x0 = select_images(images, cfg.num_images, cfg.seed).to(device)

    setup = time.perf_counter()
    src_emb = loss.source_embedding(x0)  # (N, D), once
    if method is EditMethod.markovian:
        objective: nn.Module = MarkovianObjective(model, loss, markovian.t0, markovian.train_steps)
        levels = chain_timesteps(markovian.t0, markovian.inversion_steps)
        latents = torch.cat([ddim_invert(denoiser, denoiser.schedule, x, timesteps=levels).xts[0]
                             for x in x0.split(32)])  # x_{t0} (N, C, H, W), once, 32 at a time
    else:
        objective = ScoreMatchingObjective(model, loss, cfg.large_t)
    result = EditTrainResult(rectifier, setup_seconds=time.perf_counter() - setup,
                             num_images=int(x0.shape[0]))

    opt, sched = make_optimizer(rectifier, cfg.lr, 0.0, cfg.decay_every, cfg.decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    T = denoiser.schedule.num_train_timesteps
    if LargeT(cfg.large_t) is LargeT.range:  # t ~ U{0..t_max-1}
        if not 1 <= cfg.t_max <= T:
            raise ValueError(f"t_max={cfg.t_max} must be in [1, {T}] (large_t=range)")
        T = cfg.t_max
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        idx = torch.randint(0, x0.shape[0], (cfg.batch_size,), generator=gen).to(device)
        if method is EditMethod.markovian:
            stats = edit_step_markovian(objective, opt, x0[idx], latents[idx], src_emb[idx])
        else:
            stats = edit_step_score_matching(objective, opt, x0[idx], gen, T, src_emb[idx])
        sched.step()
        result.seconds += time.perf_counter() - start
        result.history.append(stats)
        if on_step is not None:
            on_step(step + 1, stats, sched.get_last_lr()[0])
    rectifier.eval()
    return result


__all__ = [
    "EditLoss",
    "EditLossTerms",
    "EditOutput",
    "EditStepStats",
    "EditTrainResult",
    "MarkovianObjective",
    "ScoreMatchingObjective",
    "chain_timesteps",
    "delta_rms",
    "edit_rectifier_from",
    "edit_step_markovian",
    "edit_step_score_matching",
    "select_images",
    "train_edit",
]
