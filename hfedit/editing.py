"""Invert + edit one batch: the one place that composes inversion and rectifiers.

An edit of an image (ALGORITHMS.md sections 1, 2 and 4): invert it once with the backbone
(N evaluations), then sample from ``skip`` through the backbone modulated by the attribute's
rectifier conditioned on the source image (N - skip evaluations each). ``inversion.mode``
(:class:`hfedit.config.EditMode`) says how:

* ``edit_friendly`` (default): edit-friendly maps, replayed by DDPM sampling. With no rectifier
  the replay is the exact reconstruction.
* ``ddim``: DDIM inversion to ``x_T`` (:func:`hfedit.inversion.ddim_inversion`), then DDIM
  sampling (eta = 0): the protocol of DiffusionCLIP / Asyrp and, most likely, the paper's. With
  no rectifier (or an untrained one) the result is the backbone's DDIM reconstruction, which is
  not exact. ``skip`` starts from the DDIM state at ``timesteps[skip]``.

Both modes share everything below: the DDIM inversion is an :class:`InversionResult` with
zero maps and eta = 0, which :func:`hfedit.inversion.replay` samples deterministically. Every front end (CLI, Ray Data
batch job, evaluation) calls :class:`Editor`; :func:`load_editor` builds one from the pipeline's
folders (``models/backbone``, ``models/edits/<attribute>/``, ``models/rectifier``).

B images x K attributes are one replay: the B images are inverted once (one batch) and the
K*B (attribute, image) pairs are replayed as one batch of K*B samples (sample ``k * B + b`` is
image b under attribute k), every sample with the kernels of its own attribute's rectifier
(per-sample modulation); each rectifier runs on its own B images. A name without a rectifier
(``reconstruction``) is the backbone's own replay of the B images: in ``edit_friendly`` mode it
retraces the inversion's chain bit for bit, so the reconstruction stays exact. How the rectifier is conditioned (``inversion.condition``,
:class:`hfedit.config.Conditioning`):

* ``trajectory``: on ``P_t`` of the inversion's own ``x_t`` (the backbone's estimates, kept by
  :func:`hfedit.inversion.invert`: no extra evaluation; the DDIM inversion evaluates the model
  at other points, so in ``ddim`` mode one batched plain pass per step computes them). Every
  step's offsets depend on the inversion alone, so they are computed ahead of the replay, a
  window of steps at a time: one batched hypernetwork call per rectifier over the window's
  (step, image) pairs (all N - skip steps in one window when (N - skip) * B <= 512), then one
  modulated U-Net pass per step and no plain pass.
* ``live``: on ``P_t`` of the edited trajectory's current ``x_t``: per step a plain pass over the
  K*B samples, each rectifier on its B, and a modulated pass that reuses the plain pass's down
  path (:func:`hfedit.modulation.record_prefix`).

Also SDEdit-style image-to-image translation with a rectifier (the paper's "Image to Image
Translation"): :func:`sdedit` / :meth:`Editor.translate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from hfedit.backbone import Denoiser
from hfedit.config import Conditioning, EditMode, InversionConfig, ModulationMode
from hfedit.inversion import InversionResult, ddim_inversion, invert, per_image_noise, replay
from hfedit.modulation import ConvFactors, record_prefix
from hfedit.schedule import Schedule, posterior_mean, predict_x0, q_sample

RECONSTRUCTION = "reconstruction"
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


@dataclass
class EditBatch:
    """``outputs[name]``: (B, C, H, W) in [-1, 1] per requested name (``reconstruction`` or an
    attribute); ``evaluations``: denoiser evaluations each image got per name (inversion under
    "inversion"); ``passes``: the replay's U-Net passes and hypernetwork calls (all names in
    one batch); ``condition``: how the rectifiers were conditioned."""

    inversion: InversionResult
    outputs: dict[str, Tensor] = field(default_factory=dict)
    evaluations: dict[str, int] = field(default_factory=dict)
    passes: PassCount = field(default_factory=PassCount)
    condition: Conditioning = Conditioning.trajectory


class Editor:
    """Loads nothing: takes a frozen backbone and ready rectifiers (one per attribute)."""

    def __init__(
        self,
        denoiser: Denoiser,
        inversion: InversionConfig,
        rectifiers: Optional[Mapping[str, torch.nn.Module]] = None,
        reconstruction_rectifier: Optional[torch.nn.Module] = None,
    ) -> None:
        self.denoiser = denoiser
        self.cfg = inversion
        self.rectifiers = dict(rectifiers or {})
        self.reconstruction_rectifier = reconstruction_rectifier

    @property
    def attributes(self) -> list[str]:
        return sorted(self.rectifiers)

    @property
    def mode(self) -> EditMode:
        return EditMode(self.cfg.mode)

    def invert(self, x0: Tensor, seeds: Sequence[int]) -> InversionResult:
        """Maps of ``x0`` (B, C, H, W) by ``inversion.mode``: edit-friendly (image b's noise
        comes from ``seeds[b]`` alone) or DDIM (deterministic; the seeds are not used)."""
        if len(seeds) != x0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x0.shape[0]} images")
        if self.mode is EditMode.ddim:
            return ddim_inversion(self.denoiser, self.denoiser.schedule, x0, self.cfg.num_steps)
        noise = per_image_noise(seeds, self.cfg.num_steps, x0.shape[1:])
        return invert(self.denoiser, self.denoiser.schedule, x0, self.cfg.num_steps,
                      eta=self.cfg.eta, noise=noise)

    def rectifier(self, name: str) -> Optional[torch.nn.Module]:
        """The rectifier of ``name`` (None: the plain backbone, i.e. ``reconstruction`` without
        a reconstruction rectifier)."""
        if name == RECONSTRUCTION:
            return self.reconstruction_rectifier
        if name not in self.rectifiers:
            raise KeyError(f"no rectifier for attribute '{name}' (have: {self.attributes})")
        return self.rectifiers[name]

    def _replayer(self, name: str, x0: Tensor):
        from hfedit.rectifier import ModulatedDenoiser

        rect = self.rectifier(name)
        if rect is None:
            return self.denoiser
        return ModulatedDenoiser(self.denoiser, rect, rect.cfg.modulation).conditioned(x0)

    @torch.no_grad()
    def edit(self, x0: Tensor, seeds: Sequence[int], names: Sequence[str] = (RECONSTRUCTION,),
             inversion: Optional[InversionResult] = None,
             condition: Conditioning | str | None = None) -> EditBatch:
        """Invert ``x0`` (B, C, H, W) once (unless ``inversion`` is given) and replay it for
        every name: the K names with a rectifier in one batch of K*B samples, the names without
        (the backbone) in one plain replay of the B images. ``condition``: None =
        ``inversion.condition`` of the config."""
        inv = inversion if inversion is not None else self.invert(x0, seeds)
        cond = Conditioning(self.cfg.condition if condition is None else condition)
        names = list(dict.fromkeys(names))  # unique, in order
        rects = [self.rectifier(n) for n in names]
        skip, steps = self.cfg.skip, inv.num_steps - self.cfg.skip
        batch = EditBatch(inv, evaluations={"inversion": 0 if inversion is not None else inv.num_steps},
                          condition=cond)
        plain = [n for n, r in zip(names, rects) if r is None]
        rectified = {n: r for n, r in zip(names, rects) if r is not None}
        if plain:  # edit-friendly: the backbone retraces the inversion bit for bit (exact);
            # ddim: the backbone's DDIM reconstruction
            out = replay(self.denoiser, self.denoiser.schedule, inv, skip=skip)
            batch.passes.plain += steps
            batch.outputs.update((n, out) for n in plain)
        if rectified:  # every (attribute, image) pair in one batch
            joint = JointRectifier(self.denoiser, list(rectified.values()), x0, batch.passes)
            fn = joint.trajectory(inv, skip) if cond is Conditioning.trajectory else joint.live
            out = replay(fn, self.denoiser.schedule, inv, skip=skip, repeat=len(rectified))
            batch.outputs.update(zip(rectified, out.split(x0.shape[0])))  # (B, C, H, W) each
        batch.outputs = {n: batch.outputs[n] for n in names}
        batch.evaluations.update((n, steps) for n in names)
        return batch

    @torch.no_grad()
    def translate(self, x0: Tensor, seeds: Sequence[int], strength: float,
                  name: str = RECONSTRUCTION, num_steps: Optional[int] = None) -> Tensor:
        """SDEdit through the model of ``name`` (the reconstruction rectifier by default, the
        paper's setting; the plain backbone when there is none): see :func:`sdedit`."""
        if len(seeds) != x0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x0.shape[0]} images")
        n = num_steps or self.cfg.num_steps
        noise = per_image_noise(seeds, n + 1, x0.shape[1:])  # (N + 1, B, C, H, W)
        return sdedit(self._replayer(name, x0), self.denoiser.schedule, x0, strength, n,
                      eta=self.cfg.eta, noise=noise)


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
        from hfedit.rectifier import modulated_eps

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
        inversion did not keep them, e.g. after :func:`hfedit.inversion.shift_maps`, one
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
        # per step with an int t (the inversion's own form of P_t); live's tensor-t form rounds
        # differently by up to 1.5e-5 at large t, so one call over the window would change the
        # committed edits' last digits
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


# --------------------------------------------------------------------------------- SDEdit
@torch.no_grad()
def sdedit(denoiser, schedule: Schedule, x0: Tensor, strength: float, num_steps: int,
           eta: float = 1.0, noise: Optional[Tensor] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """SDEdit (Meng et al. 2021) image-to-image translation of ``x0`` (B, C, H, W) in [-1, 1].

    Of the ``num_steps`` strided timesteps, start at the first ``t_k <= strength * (T - 1)``:
    ``x_{t_k} ~ q(x_{t_k} | x0) = N(sqrt(abar) x0, (1 - abar) I)``, then ancestral sampling
    down to 0 with fresh noise, ``x_s = mu_t(x_t; denoiser) + sigma_t z`` (x0 estimate clipped
    to [-1, 1], as generation does). ``denoiser`` is any ``eps = d(x_t, t)``; with a rectifier
    it is the modulated model conditioned on ``x0`` (``ModulatedDenoiser(...).conditioned(x0)``).
    ``noise`` (>= N - k + 1, B, C, H, W): the q-sample's noise then each step's; otherwise drawn
    from ``generator``. ``strength`` in (0, 1]: larger = freer (1 = sampling from pure noise).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    timesteps = schedule.timesteps(num_steps)
    t_max = strength * (schedule.num_train_timesteps - 1)
    start = next(i for i, t in enumerate(timesteps) if t <= t_max)
    used = timesteps[start:]
    if noise is None:
        noise = torch.randn((len(used) + 1, *x0.shape), generator=generator)
    if noise.shape[0] < len(used) + 1 or noise.shape[1:] != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; need ({len(used) + 1}, "
                         f"{', '.join(map(str, x0.shape))})")
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    t0 = torch.full((x0.shape[0],), used[0], dtype=torch.long, device=x0.device)
    x = q_sample(schedule, x0, t0, noise[0])
    for i, (t, s) in enumerate(zip(used, Schedule.prev_timesteps(used))):
        coef = schedule.step_coefficients(t, s, eta)
        x = posterior_mean(coef, x, denoiser(x, t), clip_x0=True)
        if coef.sigma > 0:
            x = x + coef.sigma * noise[i + 1]
    return x


# -------------------------------------------------------------------------------- loading
EDIT_RECTIFIER_FILE = "rectifier.json"  # what marks a folder of models/edits as an attribute


def available_edits(edits_dir) -> list[str]:
    """Attribute names with a complete edit rectifier under ``edits_dir`` (sorted)."""
    from pathlib import Path

    from hfedit.checkpoint import RECTIFIER, has_checkpoint

    root = Path(edits_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and has_checkpoint(p, RECTIFIER))


def load_edit_rectifiers(edits_dir, unet: torch.nn.Module,
                         attributes: Optional[Sequence[str]] = None,
                         device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """``{attribute: rectifier}`` from ``edits_dir/<attribute>/`` (written by stage
    ``train_edits``); all of them when ``attributes`` is None. Raises KeyError naming the
    attributes that exist when one asked for is missing."""
    from pathlib import Path

    from hfedit.checkpoint import load_rectifier

    have = available_edits(edits_dir)
    wanted = list(have if attributes is None else attributes)
    missing = [a for a in wanted if a not in have]
    if missing:
        raise KeyError(f"no edit rectifier for attribute(s) {missing} in {edits_dir} "
                       f"(have: {have}); run the train_edits stage or check edits.attributes")
    out = {}
    for name in wanted:
        rect, _ = load_rectifier(Path(edits_dir) / name, unet, device=str(device))
        out[name] = rect
    return out


def load_editor(backbone, inversion: InversionConfig, edits_dir=None,
                attributes: Optional[Sequence[str]] = None, reconstruction_dir=None,
                device: str | torch.device = "cpu") -> Editor:
    """An :class:`Editor` over the backbone at ``backbone`` (folder or hub id), the edit
    rectifiers of ``attributes`` (all found when None) under ``edits_dir``, and optionally the
    reconstruction rectifier in ``reconstruction_dir`` (for :meth:`Editor.translate`)."""
    from hfedit.backbone import load_backbone
    from hfedit.checkpoint import load_rectifier

    denoiser = load_backbone(backbone, device=device)
    rectifiers = ({} if edits_dir is None else
                  load_edit_rectifiers(edits_dir, denoiser.unet, attributes, device))
    recon = None
    if reconstruction_dir is not None:
        recon, _ = load_rectifier(reconstruction_dir, denoiser.unet, device=str(device))
    return Editor(denoiser, inversion, rectifiers, recon)
