"""The paper's comparisons on held-out images, as the ``evaluate`` stage reports them.

On the first ``evaluate.images`` val images, at every ``N`` in ``evaluate.steps``:

- :func:`evaluate_reconstruction`: backbone vs rectifier x DDIM inversion vs edit-friendly
  inversion (L1, L2, SSIM, PSNR, max error; LPIPS when its weights are on disk), the noise gap
  per model and PDAE's posterior-mean gap per model and N (:mod:`hfedit.evaluation.reconstruction`);
- :func:`evaluate_edits`: per attribute with an edit rectifier, edit strength and fidelity
  (:func:`hfedit.evaluation.edits.evaluate_edit`) in ``inversion.mode`` under
  ``inversion.condition``, beside the other conditioning and the other mode with the mean / max
  difference between the two edits;
- :func:`evaluate_sdedit`: the paper's Fig. 7, SDEdit with and without the reconstruction
  rectifier from the same noise;
- :func:`batch_summary`: what the ``edit_batch`` job did, from its manifest.

Image i is seeded ``inversion.seed + i`` everywhere (:func:`image_seeds`). Every row holds the
mean, the sample standard deviation (``<metric>_std``) and the image count. Reads the models and
images it is given; writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from hfedit.config import Conditioning, EditMode, HfeditConfig

log = logging.getLogger("hfedit.evaluate")
# What the side-by-side tables (conditionings, modes) show of each edit's summary.
TABLE_KEYS = ("clip_direction", "clip_direction_std", "l1", "l1_std", "ssim", "ssim_std",
              "psnr", "psnr_std", "identity", "identity_std", "images")


def held_out(data: str | Path, count: int) -> Tensor:
    """The first ``count`` images of the prepared dataset's val split ``data``: (B, C, H, W) in
    [-1, 1] on the CPU. Raises ValueError when the split holds none."""
    from hfedit.data.prepared import load_split

    images = load_split(data, "val")[:count]
    if images.shape[0] == 0:
        raise ValueError(f"{data}: the val split holds no images: nothing to evaluate "
                         "(raise data.val_fraction or add images)")
    return images


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each of ``count`` held-out images: ``seed + i`` for image i."""
    return [seed + i for i in range(count)]


def headline_steps(cfg: HfeditConfig) -> int:
    """The N of the results table: ``inversion.num_steps`` when it is one of ``evaluate.steps``,
    else their median."""
    steps = sorted(int(n) for n in cfg.evaluate.steps)
    return cfg.inversion.num_steps if cfg.inversion.num_steps in steps else steps[len(steps) // 2]


def evaluate_reconstruction(cfg: HfeditConfig, denoiser, rectifier, images: Tensor
                            ) -> dict[str, Any]:
    """``{rows, gap, gap_std, posterior_mean_gap, lpips, lpips_note}``: the reconstruction table
    (:func:`hfedit.evaluation.reconstruction.reconstruction_table`) at every ``evaluate.steps``,
    the noise gap's mean and std per model (``evaluate.gap_timesteps`` timesteps) and the
    posterior-mean gap's rows per N and model."""
    from hfedit.evaluation import metrics as M
    from hfedit.evaluation.reconstruction import (
        mean_std,
        noise_mse,
        posterior_mean_gaps,
        reconstruction_table,
    )

    with_lpips, lpips_note = M.lpips_available()
    bs = cfg.runtime.eval_batch_size
    rows = reconstruction_table(denoiser, images, cfg.evaluate.steps, rectifier,
                                eta=cfg.inversion.eta, seed=cfg.inversion.seed, batch_size=bs,
                                with_lpips=with_lpips)
    models = {"backbone": None, **({"rectifier": rectifier} if rectifier is not None else {})}
    gaps = {name: mean_std(noise_mse(denoiser, images, rect, cfg.inversion.seed, bs,
                                     cfg.evaluate.gap_timesteps))
            for name, rect in models.items()}
    mean_gaps = posterior_mean_gaps(denoiser, images, cfg.evaluate.steps, rectifier,
                                    cfg.inversion.seed, bs)
    return {"rows": rows, "gap": {m: g["mean"] for m, g in gaps.items()},
            "gap_std": {m: g["std"] for m, g in gaps.items()},
            "posterior_mean_gap": mean_gaps,
            "lpips": with_lpips, "lpips_note": lpips_note}


def evaluate_edits(cfg: HfeditConfig, denoiser, edits: dict, clip, images: Tensor
                   ) -> tuple[dict, dict, dict, dict]:
    """``({attribute: [summary per N]}, {attribute: [(N, edited)]}, {attribute: [conditioning
    comparison per N]}, {attribute: [mode comparison per N]})``: the summaries and edits are
    those of ``inversion.mode`` and ``inversion.condition``; the conditioning comparison scores
    both conditionings (:class:`hfedit.config.Conditioning`) in that mode, the mode comparison
    both modes (:class:`hfedit.config.EditMode`: edit-friendly replay, DDIM inversion +
    sampling) under that conditioning, side by side with the mean and max absolute difference
    between their edits; each comparison only when ``evaluate.side_by_side`` names it (else its
    dict stays empty). Attributes without an ``edits.attributes`` entry are skipped."""
    from hfedit.editing.editor import Editor
    from hfedit.evaluation.edits import evaluate_edit
    from hfedit.evaluation.identity import identity_scorer
    from hfedit.models.clip import DirectionalClipLoss

    seeds = image_seeds(cfg.inversion.seed, images.shape[0])
    scorer, note = identity_scorer(cfg.edits.ablation.min_face_px, int(images.shape[-1]))
    default = Conditioning(cfg.inversion.condition)
    mode = EditMode(cfg.inversion.mode)
    other = EditMode.ddim if mode is EditMode.edit_friendly else EditMode.edit_friendly
    results: dict[str, list] = {}
    edited: dict[str, list] = {}
    compared: dict[str, list] = {}
    modes: dict[str, list] = {}

    def side_by_side(n: int, evs: dict, default_key: str, first, second) -> dict:
        diff = (evs[first].edited - evs[second].edited).abs()
        return {"steps": n, "default": default_key,
                **{k.value: {m: v for m, v in e.summary().items() if m in TABLE_KEYS}
                   for k, e in evs.items()},
                "difference": {"mean": float(diff.mean()), "max": float(diff.max())}}

    for name, rect in edits.items():
        attr = cfg.edits.attributes.get(name)
        if attr is None:
            log.warning("models/edits/%s has no entry in edits.attributes: not evaluated", name)
            continue
        direction = DirectionalClipLoss(clip, attr.source, attr.target)

        def run(n: int, m: EditMode, c: Conditioning):
            editor = Editor(denoiser, replace(cfg.inversion, num_steps=n, mode=m), {name: rect})
            return evaluate_edit(editor, name, images, seeds, direction, scorer,
                                 batch_size=cfg.runtime.eval_batch_size, identity_note=note,
                                 condition=c)

        wanted = set(cfg.evaluate.side_by_side)
        for n in (int(n) for n in cfg.evaluate.steps):
            evs = {c: run(n, mode, c) for c in Conditioning
                   if c is default or "conditioning" in wanted}
            ev = evs[default]
            results.setdefault(name, []).append({"steps": n, "mode": mode.value, **ev.summary()})
            edited.setdefault(name, []).append((n, ev.edited))
            if "conditioning" in wanted:
                compared.setdefault(name, []).append(side_by_side(
                    n, evs, default.value, Conditioning.trajectory, Conditioning.live))
            if "modes" in wanted:
                by_mode = {mode: ev, other: run(n, other, default)}
                modes.setdefault(name, []).append(side_by_side(
                    n, by_mode, mode.value, EditMode.edit_friendly, EditMode.ddim))
    return results, edited, compared, modes


def evaluate_sdedit(cfg: HfeditConfig, denoiser, rectifier, images: Tensor, n: int
                    ) -> list[dict]:
    """The paper's Fig. 7: SDEdit (:meth:`hfedit.editing.editor.Editor.translate`) of every image
    at each ``evaluate.sdedit_strengths`` in N steps, through the backbone alone and through the
    reconstruction rectifier conditioned on the source, with the same noise (image i seeded
    ``inversion.seed + i``). Rows ``{strength, steps, backbone: {...}, rectifier: {...},
    difference: {mean, max}}``: L1 / SSIM / PSNR of the result to its source, mean ± std."""
    from hfedit.editing.editor import Editor
    from hfedit.evaluation import metrics as M
    from hfedit.evaluation.reconstruction import mean_std

    seeds = image_seeds(cfg.inversion.seed, images.shape[0])
    inv = replace(cfg.inversion, num_steps=n)
    editors = {"backbone": Editor(denoiser, inv),
               "rectifier": Editor(denoiser, inv, reconstruction_rectifier=rectifier)}
    bs = cfg.runtime.eval_batch_size
    rows = []
    for strength in cfg.evaluate.sdedit_strengths:
        outs = {}
        for model, editor in editors.items():
            outs[model] = torch.cat([
                editor.translate(images[i: i + bs].to(denoiser.device), seeds[i: i + bs],
                                 float(strength)).float().cpu().clamp(-1, 1)
                for i in range(0, images.shape[0], bs)])
        row: dict[str, Any] = {"strength": float(strength), "steps": n}
        for model, out in outs.items():
            row[model] = {}
            for k, fn in (("l1", M.l1), ("ssim", M.ssim), ("psnr", M.psnr)):
                st = mean_std(fn(images, out))
                row[model].update({k: st["mean"], f"{k}_std": st["std"], "images": st["images"]})
        diff = (outs["rectifier"] - outs["backbone"]).abs()
        row["difference"] = {"mean": float(diff.mean()), "max": float(diff.max())}
        rows.append(row)
    return rows


def clip_summary(cfg: HfeditConfig, clip) -> dict[str, Any]:
    """``{model, weights, semantic[, note]}`` of the CLIP the edits were scored with; the note
    says so when its weights are random (the scores are then not semantic)."""
    from hfedit.models.clip import NOT_SEMANTIC

    out: dict[str, Any] = {"model": clip.name, "weights": cfg.clip.weights,
                           "semantic": clip.semantic}
    if not clip.semantic:
        out["note"] = NOT_SEMANTIC
    return out


def batch_summary(batch: Path) -> dict[str, Any]:
    """Per attribute of the ``edit_batch`` run in ``batch`` (its manifest): ok / failed counts,
    failure reasons, mean L1 and SSIM of the ok rows (None where there are none); a note when
    ``batch`` holds no manifest."""
    from hfedit.data.batch_manifest import MANIFEST, read_manifest

    if not (batch / MANIFEST).is_file():
        return {"note": f"{batch / MANIFEST} not found: run the edit_batch stage"}

    def mean(values) -> Optional[float]:
        m = values.mean()  # NaN (SSIM of tiny images) skipped
        return None if m != m else float(m)

    out: dict[str, Any] = {}
    for name, rows in read_manifest(batch).groupby("attribute"):
        ok, bad = rows[rows.status == "ok"], rows[rows.status != "ok"]
        out[str(name)] = {"ok": len(ok), "failed": len(bad), "l1": mean(ok.l1), "ssim": mean(ok.ssim),
                          "reasons": {str(k): int(v) for k, v in bad.reason.value_counts().items()}}
    return out
