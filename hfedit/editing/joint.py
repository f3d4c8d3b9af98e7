"""K rectifiers in one batch: the B x K (image, attribute) samples of an edit modulated
by per-sample kernels, conditioned live or on the inversion's trajectory (offsets computed a
window of steps ahead of the replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from hfedit.models.backbone import Denoiser
from hfedit.config import ModulationMode
from hfedit.diffusion.inversion import InversionResult
from hfedit.models.modulation import ConvFactors, record_prefix
from hfedit.diffusion.schedule import predict_x0

# (step, image) pairs per hypernetwork call of a trajectory-conditioned edit (rounded down to
# whole steps, at least one): bounds the trunk's activations (a ResNet34 at 256 px holds ~15 MB
# per sample) and the factors held (one window of steps); every pair is independent of the
# others (GroupNorm), so the chunking changes nothing but float rounding.
HYPERNETWORK_BATCH = 512


@dataclass
class PassCount:
    """What a replay cost, counted per step over the whole K*B batch: ``plain`` and
    ``modulated`` U-Net passes, ``hypernetwork`` rectifier calls."""

    plain: int = 0
    modulated: int = 0
    hypernetwork: int = 0


# ------------------------------------------------------------------- K rectifiers, one batch
class JointRectifier:
    """K rectifiers (None = the backbone's own kernels) over one batch of K*B samples: sample
    ``k * B + b`` is source image ``x0[b]`` under rectifier k.

    The modulated convs are the union of the rectifiers' targets; a rectifier without a target
    (and every None) gives it zero offsets, i.e. ``theta * (1 + 0) = theta`` exactly. The
    modulation path is the first rectifier's ``cfg.modulation`` (every path is exact).
    ``passes`` counts what is run.
    """

    def __init__(self, denoiser: Denoiser, rectifiers: Sequence[Optional[torch.nn.Module]],
                 x0: Tensor, passes: Optional[PassCount] = None) -> None:
        present = [r for r in rectifiers if r is not None]
        if not present:
            raise ValueError("JointRectifier needs at least one rectifier")
        self.denoiser, self.rectifiers, self.x0 = denoiser, list(rectifiers), x0
        self.passes = passes if passes is not None else PassCount()
        self.mode = ModulationMode(present[0].cfg.modulation)
        names = dict.fromkeys(n for r in present for n in r.target_names)  # ordered union
        unet = denoiser.unet
        self.shapes = {n: tuple(unet.get_submodule(n).weight.shape) for n in names}  # (Co, Ci, kh, kw)

    @property
    def batch(self) -> int:
        return len(self.rectifiers) * self.x0.shape[0]

    def _joint(self, per: Sequence[Optional[dict[str, ConvFactors]]], lead: tuple[int, ...]
               ) -> dict[str, ConvFactors]:
        """Concatenate per-rectifier factors with leading dims ``lead`` (the last one B) along
        that last leading dim: (*lead[:-1], K*B, kh, kw, C) per target."""
        out, dim = {}, len(lead) - 1
        for name, (co, ci, kh, kw) in self.shapes.items():
            a, b = [], []
            for f in per:
                if f is not None and name in f:
                    a.append(f[name].a)
                    b.append(f[name].b)
                else:
                    a.append(self.x0.new_zeros(*lead, kh, kw, ci))
                    b.append(self.x0.new_zeros(*lead, kh, kw, co))
            out[name] = ConvFactors(torch.cat(a, dim), torch.cat(b, dim))
        return out

    def _modulated(self, factors: dict[str, ConvFactors], x_t: Tensor, t, reuse=None) -> Tensor:
        from hfedit.models.rectifier import modulated_eps

        self.passes.modulated += 1
        return modulated_eps(self.denoiser, factors, x_t, t, self.mode, reuse=reuse)

    def live(self, x_t: Tensor, t: int) -> Tensor:
        """``eps`` of the K*B samples at ``(x_t, t)``: a plain pass for ``P_t`` (its down path
        recorded), each rectifier on its B samples, a modulated pass reusing the down path."""
        bsz = self.x0.shape[0]
        tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        with record_prefix(self.denoiser.unet, list(self.shapes)) as prefix:
            eps_plain = self.denoiser(x_t, tt)  # (K*B, C, H, W)
        self.passes.plain += 1
        p_t = predict_x0(self.denoiser.schedule, x_t, tt, eps_plain)
        per = []
        for k, rect in enumerate(self.rectifiers):
            part = slice(k * bsz, (k + 1) * bsz)
            per.append(None if rect is None else rect(self.x0, p_t[part], tt[part]))
            self.passes.hypernetwork += rect is not None
        return self._modulated(self._joint(per, (bsz,)), x_t, tt, reuse=prefix)

    def trajectory(self, inv: InversionResult, skip: int,
                   chunk: int = HYPERNETWORK_BATCH) -> "TrajectoryReplayer":
        """Every step's offsets from ``P_t`` of the inversion's ``x_t`` (``inv.eps``; when the
        inversion did not keep them, e.g. after :func:`hfedit.diffusion.inversion.shift_maps`, one
        batched plain evaluation per window of steps computes them first).

        The offsets are computed a window of ``max(1, chunk // B)`` steps ahead, one
        hypernetwork call per rectifier and window, as the replay reaches it: what is held is
        one window's factors (``chunk`` x K x the targets' ``kh*kw*(C_in + C_out)`` floats, 0.67
        GB per attribute for the CelebA-HQ-256 U-Net at the default 512), not all N steps' (N x
        K x B of them: 62 GB at N = 1000, K*B = 48)."""
        if self.x0.shape[0] != inv.xts.shape[1]:
            raise ValueError(f"{self.x0.shape[0]} source images for maps of {inv.xts.shape[1]}")
        return TrajectoryReplayer(self, inv, skip, max(1, chunk // self.x0.shape[0]))

    def window(self, inv: InversionResult, steps: range) -> dict[str, ConvFactors]:
        """The joint factors of ``steps`` (indices into ``inv.timesteps``), (S', K*B, kh, kw, C)
        per target: one hypernetwork call per rectifier over the S' x B (step, image) pairs."""
        bsz, n = self.x0.shape[0], len(steps)
        ts = [inv.timesteps[j] for j in steps]
        t_flat = torch.tensor(ts, device=self.x0.device).repeat_interleave(bsz)  # (S'*B,)
        xts = inv.xts[steps.start:steps.stop].flatten(0, 1)  # sample i*B + b: image b at step i
        if inv.eps is not None:
            eps = inv.eps[steps.start:steps.stop].flatten(0, 1)
        else:
            eps = self.denoiser(xts, t_flat)
            self.passes.plain += n
        # P_t per step with an int t: the coefficients as float64 scalars, the inversion's own
        # form. The tensor-t form (one call over the window, as live uses) takes abar in the
        # sample's float32 before the square roots and rounds differently (most at large t).
        p_t = torch.cat([predict_x0(self.denoiser.schedule, x, t, e)  # (S'*B, C, H, W)
                         for x, t, e in zip(xts.split(bsz), ts, eps.split(bsz))])
        x0 = self.x0.repeat(n, 1, 1, 1)  # (S'*B, C, H, W)
        per = []
        for rect in self.rectifiers:
            if rect is None:
                per.append(None)
                continue
            f = rect(x0, p_t, t_flat)
            self.passes.hypernetwork += 1
            per.append({k: ConvFactors(v.a.unflatten(0, (n, bsz)), v.b.unflatten(0, (n, bsz)))
                        for k, v in f.items()})
        return self._joint(per, (n, bsz))


class TrajectoryReplayer:
    """``eps = d(x_t, t)`` for the K*B samples with offsets from the inversion's trajectory: one
    modulated pass per step; the offsets of the next ``window`` steps are computed when the
    replay reaches the first of them (:meth:`JointRectifier.trajectory`)."""

    def __init__(self, joint: JointRectifier, inv: InversionResult, skip: int,
                 window: int) -> None:
        self.joint, self.inv, self.window = joint, inv, window
        self.step = {int(t): j for j, t in enumerate(inv.timesteps) if j >= skip}
        self.schedule = joint.denoiser.schedule
        self.held = range(0)  # the steps whose factors are held
        self.factors: dict[str, ConvFactors] = {}  # per target (len(held), K*B, kh, kw, C)

    def __call__(self, x_t: Tensor, t: int) -> Tensor:
        j = self.step[int(t)]
        if j not in self.held:
            self.factors = {}  # the previous window's go before the next one is computed
            self.held = range(j, min(j + self.window, self.inv.num_steps))
            self.factors = self.joint.window(self.inv, self.held)
        i = j - self.held.start
        return self.joint._modulated({n: ConvFactors(f.a[i], f.b[i]) for n, f in self.factors.items()},
                                     x_t, t)
