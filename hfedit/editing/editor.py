"""Invert + edit one batch: the one place that composes inversion and rectifiers.

An edit of an image (ALGORITHMS.md sections 1, 2 and 4): invert it once with the backbone
(N evaluations), then sample from ``skip`` through the backbone modulated by the attribute's
rectifier conditioned on the source image (N - skip evaluations each). ``inversion.mode``
(:class:`hfedit.config.EditMode`) says how:

* ``edit_friendly`` (default): edit-friendly maps, replayed by DDPM sampling. With no rectifier
  the replay is the exact reconstruction.
* ``ddim``: DDIM inversion to ``x_T`` (:func:`hfedit.diffusion.inversion.ddim_invert`), then
  DDIM sampling (eta = 0): the protocol of DiffusionCLIP / Asyrp and, most likely, the paper's.
  With no rectifier (or an untrained one) the result is the backbone's DDIM reconstruction,
  which is not exact. ``skip`` starts from the DDIM state at ``timesteps[skip]``.

Both modes share everything below: the DDIM inversion is an :class:`InversionResult` with
zero maps and eta = 0, which :func:`hfedit.diffusion.inversion.replay` samples
deterministically. Every front end (CLI, Ray Data batch job, evaluation) calls
:class:`Editor`; :func:`load_editor` builds one from the pipeline's folders
(``models/backbone``, ``models/edits/<attribute>/``, ``models/rectifier``).

B images x K attributes are one replay: the B images are inverted once (one batch) and the
K*B (attribute, image) pairs are replayed as one batch of K*B samples (sample ``k * B + b`` is
image b under attribute k), every sample with the kernels of its own attribute's rectifier
(per-sample modulation); each rectifier runs on its own B images. A name without a rectifier
(``reconstruction``) is the backbone's own replay of the B images: in ``edit_friendly`` mode it
retraces the inversion's chain bit for bit, so the reconstruction stays exact. How the
rectifier is conditioned (``inversion.condition``, :class:`hfedit.config.Conditioning`):

* ``trajectory``: on ``P_t`` of the inversion's own ``x_t`` (the backbone's estimates, kept by
  :func:`hfedit.diffusion.inversion.invert`: no extra evaluation; the DDIM inversion evaluates
  the model at other points, so in ``ddim`` mode one batched plain pass per step computes
  them). Every step's offsets depend on the inversion alone, so they are computed ahead of the
  replay, a window of steps at a time: one batched hypernetwork call per rectifier over the
  window's (step, image) pairs (all N - skip steps in one window when (N - skip) * B <= 512),
  then one modulated U-Net pass per step and no plain pass.
* ``live``: on ``P_t`` of the edited trajectory's current ``x_t``: per step a plain pass over the
  K*B samples, each rectifier on its B, and a modulated pass that reuses the plain pass's down
  path (:func:`hfedit.models.modulation.record_prefix`).

Also SDEdit-style image-to-image translation with a rectifier (the paper's "Image to Image
Translation"): :func:`hfedit.diffusion.sampling.sdedit` / :meth:`Editor.translate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from hfedit.models.backbone import Denoiser
from hfedit.config import Conditioning, EditMode, InversionConfig
from hfedit.diffusion.inversion import InversionResult, ddim_invert, invert, per_image_noise, replay
from hfedit.diffusion.sampling import sdedit
from hfedit.editing.joint import JointRectifier, PassCount

RECONSTRUCTION = "reconstruction"


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
            return ddim_invert(self.denoiser, self.denoiser.schedule, x0, self.cfg.num_steps)
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
        from hfedit.models.rectifier import ModulatedDenoiser

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
        paper's setting; the plain backbone when there is none): see
        :func:`hfedit.diffusion.sampling.sdedit`."""
        if len(seeds) != x0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x0.shape[0]} images")
        n = num_steps or self.cfg.num_steps
        noise = per_image_noise(seeds, n + 1, x0.shape[1:])  # (N + 1, B, C, H, W)
        return sdedit(self._replayer(name, x0), self.denoiser.schedule, x0, strength, n,
                      eta=self.cfg.eta, noise=noise)


# -------------------------------------------------------------------------------- loading
EDIT_RECTIFIER_FILE = "rectifier.json"  # what marks a folder of models/edits as an attribute


def available_edits(edits_dir) -> list[str]:
    """Attribute names with a complete edit rectifier under ``edits_dir`` (sorted)."""
    from pathlib import Path

    from hfedit.models.checkpoint import RECTIFIER, has_checkpoint

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

    from hfedit.models.checkpoint import load_rectifier

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
    from hfedit.models.backbone import load_backbone
    from hfedit.models.checkpoint import load_rectifier

    denoiser = load_backbone(backbone, device=device)
    rectifiers = ({} if edits_dir is None else
                  load_edit_rectifiers(edits_dir, denoiser.unet, attributes, device))
    recon = None
    if reconstruction_dir is not None:
        recon, _ = load_rectifier(reconstruction_dir, denoiser.unet, device=str(device))
    return Editor(denoiser, inversion, rectifiers, recon)
