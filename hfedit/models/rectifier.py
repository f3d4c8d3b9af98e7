"""The rectifier: a hypernetwork that modulates a frozen U-Net per image and per step.

Paper 2312.15707 ("Hypernetwork as Rectifier", appendix A); ALGORITHMS.md section 3. At step t

    P_t       = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)        (the plain x0 estimate)
    Delta_t   = R(x0, P_t, t)                                                    (eq. 1)
    theta_hat = theta * (1 + Delta_t)   for every target conv, per sample        (eq. 2)
    eps_hat   = eps_theta_hat(x_t, t)

``R`` = a ResNet trunk over ``concat(x0, P_t)`` (6 channels) and one subnet branch per target
conv: two strided 3x3 convs (the time embedding added as a per-channel bias after the first, as
in a U-Net ResnetBlock2D), average pooling to 1x1, and two heads giving the separable factors
``A`` (B, kh*kw*C_in) and ``B`` (B, kh*kw*C_out) with ``Delta[b,o,i,h,w] = A[b,h,w,i] B[b,h,w,o]``.
The ``A`` head starts at exactly zero and the ``B`` head does not, so an untrained rectifier is
the backbone (Delta = 0) and its first gradient step already moves ``A`` (dL/dA ~ B != 0).
The kernels are modulated by :mod:`hfedit.models.modulation`; the backbone is never written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfedit.config import ModulationMode, RectifierConfig, RectifierTrunk
from hfedit.models.modulation import (
    ConvFactors,
    TargetPatterns,
    find_targets,
    modulate,
    patterns_from_config,
    record_prefix,
)
from hfedit.diffusion.schedule import predict_x0

# Parameters shared by every target conv: the ResNet trunk and the time MLP. Edit rectifiers
# can keep them from their reconstruction rectifier (EditsConfig.share_trunk).
SHARED_PREFIXES = ("trunk.", "time_mlp.")
TRUNK_CHANNELS = 512  # output channels of torchvision's resnet18/resnet34 layer4
_GROUPS = 32  # GroupNorm groups in the trunk (every width 64..512 divides)


def _timesteps(t: Tensor | int, batch: int, device: torch.device) -> Tensor:
    """``t`` as a (B,) long tensor."""
    if not torch.is_tensor(t):
        return torch.full((batch,), int(t), device=device, dtype=torch.long)
    t = t.to(device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected an int, a scalar or ({batch},)")
    return t


def build_trunk(trunk: RectifierTrunk) -> nn.Sequential:
    """torchvision ResNet (random init) with a 6-channel stem, without its pooling and fc.

    BatchNorm is replaced by GroupNorm so that every sample's offsets depend on that sample only
    (batch composition, batch size 1 and Ray sharding cannot change an edit).
    Output: (B, 512, H/32, W/32).
    """
    from torchvision.models import resnet18, resnet34

    make = {RectifierTrunk.resnet18: resnet18, RectifierTrunk.resnet34: resnet34}[RectifierTrunk(trunk)]
    net = make(weights=None, norm_layer=lambda c: nn.GroupNorm(_GROUPS, c))
    stem = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(stem, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                         net.layer4)


class Rectifier(nn.Module):
    """``R(x0, P_t, t) -> {target conv name: ConvFactors}`` (eq. 1), for one backbone.

    Built deterministically from ``(cfg, unet)``: the targets (and so every parameter's name
    and shape) follow from the pattern set and ``unet.named_modules()``, so a state_dict saved
    from one instance loads into another built from the same config and backbone architecture.
    """

    def __init__(self, cfg: RectifierConfig, unet: nn.Module,
                 patterns: Optional[TargetPatterns] = None) -> None:
        super().__init__()
        targets = find_targets(unet, patterns or patterns_from_config(cfg))
        self.cfg = cfg
        self.target_names: tuple[str, ...] = tuple(targets)
        self.kernel_shapes: tuple[tuple[int, int, int, int], ...] = tuple(
            tuple(conv.weight.shape) for conv in targets.values()  # (C_out, C_in, kh, kw)
        )
        n, c, d = len(targets), cfg.branch_channels, cfg.time_embed_dim
        if c < 1 or d < 2 or d % 2:
            raise ValueError(f"rectifier: branch_channels={c} must be >= 1 and time_embed_dim={d} "
                             "even and >= 2")
        self.trunk = build_trunk(cfg.trunk)
        # time: sinusoid (as UNet2DModel: flip_sin_to_cos, no shift) -> MLP, shared by branches
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        # The n branches as one bank: group g of every layer is branch g's own weights.
        self.branch_conv1 = nn.Conv2d(TRUNK_CHANNELS, n * c, 3, stride=2, padding=1)
        self.branch_time = nn.Linear(d, n * c)  # ResnetBlock2D.time_emb_proj, per branch
        self.branch_conv2 = nn.Conv2d(n * c, n * c, 3, stride=2, padding=1, groups=n)
        self.head_a = nn.ModuleList(nn.Linear(c, kh * kw * ci) for _, ci, kh, kw in self.kernel_shapes)
        self.head_b = nn.ModuleList(nn.Linear(c, kh * kw * co) for co, _, kh, kw in self.kernel_shapes)
        for head in self.head_a:  # A = 0 exactly => Delta = 0; B stays random so dL/dA != 0
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def freeze_shared(self) -> "Rectifier":
        """Stop gradients to the parameters every target shares (:data:`SHARED_PREFIXES`)."""
        for name, param in self.named_parameters():
            if name.startswith(SHARED_PREFIXES):
                param.requires_grad_(False)
        return self

    @property
    def num_targets(self) -> int:
        return len(self.target_names)

    def time_embedding(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, time_embed_dim)."""
        from diffusers.models.embeddings import get_timestep_embedding

        emb = get_timestep_embedding(t, self.cfg.time_embed_dim, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)
        return self.time_mlp(emb.to(self.branch_time.weight.dtype))

    def features(self, x: Tensor) -> Tensor:
        """The trunk over ``x`` (B, 6, H, W) -> (B, 512, H/32, W/32). Its stem (7x7 conv, norm,
        ReLU, 3x3 max pool) runs in channels-last memory, where the CPU's max pool with indices
        is vectorised over channels (over NCHW it is not) and the 6-channel stem conv is
        faster too; the layers after it stay NCHW, where GroupNorm and the 3x3 convs of the
        small late maps are faster. The two layouts round differently (by up to ~1e-5), so
        switching the stem's layout changes the offsets in their last digits."""
        stem, rest = self.trunk[:4], self.trunk[4:]
        h = stem(x.contiguous(memory_format=torch.channels_last))
        return rest(h.contiguous())

    def forward(self, x0: Tensor, p_t: Tensor, t: Tensor | int) -> dict[str, ConvFactors]:
        """``x0``, ``p_t``: (B, 3, H, W) in [-1, 1] (``p_t`` is clipped to it, as DDIM clips its
        x0 estimate; at large t it is far outside); ``t``: int or (B,). Returns the factors of
        every target conv, keyed by its name in ``unet.named_modules()``."""
        if x0.shape != p_t.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and P_t {tuple(p_t.shape)} differ in shape")
        bsz = x0.shape[0]
        n, c = self.num_targets, self.cfg.branch_channels
        feat = self.features(torch.cat([x0, p_t.clamp(-1.0, 1.0)], dim=1))  # (B, 512, H/32, W/32)
        # The branch bank runs in float32 even under autocast: it is tiny (1x1 to 4x4 maps), and
        # torch's CPU bf16 gradient of its strided grouped conv on a 1x1 map (32 px images) can
        # be non-finite (torch 2.14, one thread; tests/test_device.py trains under bf16).
        with torch.autocast(x0.device.type, enabled=False):
            feat = feat.to(self.branch_conv1.weight.dtype)
            temb = self.time_embedding(_timesteps(t, bsz, x0.device))  # (B, D)
            h = self.branch_conv1(feat)  # (B, n*c, H/64, W/64), at least 1x1
            h = h + self.branch_time(F.silu(temb))[:, :, None, None]
            h = self.branch_conv2(F.silu(h))  # (B, n*c, H/128, W/128), at least 1x1; per branch
            h = F.adaptive_avg_pool2d(F.silu(h), 1).view(bsz, n, c)  # (B, n, c)
        out: dict[str, ConvFactors] = {}
        for g, (name, (co, ci, kh, kw)) in enumerate(zip(self.target_names, self.kernel_shapes)):
            a = self.head_a[g](h[:, g]).view(bsz, kh, kw, ci)  # (B, kh, kw, C_in)
            b = self.head_b[g](h[:, g]).view(bsz, kh, kw, co)  # (B, kh, kw, C_out)
            out[name] = ConvFactors(a, b)
        return out


def build_rectifier(cfg: RectifierConfig, unet: nn.Module) -> Rectifier:
    """The rectifier of ``cfg`` for this backbone, on the backbone's device."""
    device = next(unet.parameters()).device
    return Rectifier(cfg, unet).to(device)


# --------------------------------------------------------------------------- the whole step
@dataclass(frozen=True)
class RectifiedStep:
    """One rectified denoising step at (x_t, t) for source images x0.

    ``eps_hat``: the modulated model's noise prediction (carries the rectifier's graph);
    ``eps_plain``: the frozen backbone's (no graph); ``p_t``: ``P_t[eps_plain]``, unclipped;
    ``factors``: the offsets that produced ``eps_hat``.
    """

    eps_hat: Tensor
    eps_plain: Tensor
    p_t: Tensor
    factors: dict[str, ConvFactors]


def modulated_eps(denoiser: nn.Module, factors: dict[str, ConvFactors], x_t: Tensor,
                  t: Tensor | int, mode: ModulationMode | str = ModulationMode.auto,
                  reuse: Optional[dict[str, object]] = None, checkpoint: bool = False) -> Tensor:
    """``eps_theta_hat(x_t, t)``: one backbone pass with per-sample modulated target kernels
    (``reuse``: see :func:`hfedit.models.modulation.record_prefix`; ``checkpoint``: activation
    checkpointing of the modulated blocks, only when gradients are being recorded)."""
    checkpoint = checkpoint and torch.is_grad_enabled()
    with modulate(denoiser.unet, factors, mode, reuse, checkpoint=checkpoint):
        return denoiser(x_t, t)


def _network_autocast(denoiser: nn.Module):
    """The autocast of the denoiser's precision (a plain module: none)."""
    return denoiser.autocast() if hasattr(denoiser, "autocast") else contextlib.nullcontext()


def rectified_step(denoiser: nn.Module, rectifier: Rectifier, x_t: Tensor, t: Tensor | int,
                   x0: Tensor, mode: ModulationMode | str | None = None,
                   reuse_prefix: bool = True, checkpoint: bool = False) -> RectifiedStep:
    """Plain pass for ``P_t`` (no grad), hypernetwork, modulated pass: ALGORITHMS.md section 3.

    ``x_t``, ``x0``: (B, C, H, W); ``t``: int or (B,). Cost: two U-Net passes plus the rectifier,
    less the part of the modulated pass before the first target (the down path of a U-Net
    modulated in its middle and up blocks): with ``reuse_prefix`` the modulated pass takes those
    outputs from the plain pass (exact, see :func:`hfedit.models.modulation.record_prefix`); not when
    ``x_t`` requires grad (the recorded outputs carry no graph). Gradients reach ``x_t`` through
    the modulated pass only (``P_t`` is a constant input of the rectifier).
    ``mode``: the modulation path; None = ``rectifier.cfg.modulation``. ``checkpoint``:
    activation checkpointing of the modulated pass while training (:func:`modulated_eps`).
    Under the denoiser's precision (:class:`hfedit.models.backbone.Denoiser`) both passes and the
    hypernetwork run in autocast; the offsets and ``eps`` come back in ``x_t``'s dtype.
    """
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and x0 {tuple(x0.shape)} differ in shape")
    t = _timesteps(t, x_t.shape[0], x_t.device)
    with torch.no_grad(), record_prefix(denoiser.unet, rectifier.target_names) as prefix:
        eps_plain = denoiser(x_t, t)  # (B, C, H, W)
    p_t = predict_x0(denoiser.schedule, x_t, t, eps_plain)
    with _network_autocast(denoiser):  # the hypernetwork at the denoiser's precision
        factors = rectifier(x0, p_t, t)
    factors = {k: ConvFactors(f.a.to(x_t.dtype), f.b.to(x_t.dtype)) for k, f in factors.items()}
    mode = rectifier.cfg.modulation if mode is None else mode
    reuse = reuse_prefix and not (torch.is_grad_enabled() and x_t.requires_grad)
    eps_hat = modulated_eps(denoiser, factors, x_t, t, mode, reuse=prefix if reuse else None,
                            checkpoint=checkpoint)
    return RectifiedStep(eps_hat, eps_plain, p_t, factors)


class ModulatedDenoiser(nn.Module):
    """The frozen backbone and its rectifier: ``eps_hat = md(x_t, t, x0)``.

    Freezes the backbone (``requires_grad=False``, eval mode, also after ``.train()``); only
    the rectifier's parameters train. Checkpoint ``md.rectifier.state_dict()``. ``mode``: the
    modulation path; None = ``rectifier.cfg.modulation``.
    ``md.conditioned(x0)`` is an ordinary ``eps = d(x_t, t)`` denoiser for sampling/replay.
    ``checkpoint``: activation checkpointing of the modulated pass in training (same values
    and gradients, less memory).
    """

    def __init__(self, denoiser: nn.Module, rectifier: Rectifier,
                 mode: ModulationMode | str | None = None, checkpoint: bool = False) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        missing = [n for n in rectifier.target_names if not _is_conv(denoiser.unet, n)]
        if missing:
            raise ValueError(f"rectifier targets not in this backbone: {missing[:5]}")
        self.denoiser = denoiser.freeze()
        self.rectifier = rectifier
        self.mode = ModulationMode(rectifier.cfg.modulation if mode is None else mode)

    @property
    def schedule(self):
        return self.denoiser.schedule

    def train(self, mode: bool = True) -> "ModulatedDenoiser":
        super().train(mode)
        self.denoiser.eval()
        return self

    def step(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> RectifiedStep:
        return rectified_step(self.denoiser, self.rectifier, x_t, t, x0, self.mode,
                              checkpoint=self.checkpoint)

    def forward(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        return self.step(x_t, t, x0).eps_hat

    def modulated(self, x_t: Tensor, t: Tensor | int, factors: dict[str, ConvFactors]) -> Tensor:
        """The modulated pass alone, with given factors."""
        return modulated_eps(self.denoiser, factors, x_t, t, self.mode, checkpoint=self.checkpoint)

    def conditioned(self, x0: Tensor) -> "ConditionedDenoiser":
        return ConditionedDenoiser(self, x0)


class ConditionedDenoiser:
    """``eps = d(x_t, t)``: the modulated model conditioned on fixed source images ``x0``."""

    def __init__(self, model: ModulatedDenoiser, x0: Tensor) -> None:
        self.model, self.x0 = model, x0
        self.schedule = model.schedule

    def __call__(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        return self.model(x_t, t, self.x0)


def _is_conv(unet: nn.Module, name: str) -> bool:
    try:
        return isinstance(unet.get_submodule(name), nn.Conv2d)
    except AttributeError:
        return False


__all__ = [
    "SHARED_PREFIXES",
    "ConditionedDenoiser",
    "ModulatedDenoiser",
    "RectifiedStep",
    "Rectifier",
    "build_rectifier",
    "build_trunk",
    "modulated_eps",
    "rectified_step",
]
