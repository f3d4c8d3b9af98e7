"""Trajectory vs live conditioning of a trained edit rectifier: the same edits, scored side by side.

    .venv/bin/python benchmarks/conditioning.py [--backbone-steps 300] [--edit-steps 40] \
        [--steps 50] [--images 8] [--backbone DIR --rectifier DIR --edits DIR]

Without folders: trains the default tiny backbone on real faces (``--backbone-steps``, LFW
crops 9.., the training images), an edit rectifier for the ``smiling`` attribute of params.yaml
with Algorithm 1 (``--edit-steps``, from an untrained reconstruction rectifier, i.e. the
backbone itself), with the default CLIP (random weights offline: the edit direction is not
semantic, but it is the direction the rectifier was trained towards, and the one scored).
With ``--backbone/--rectifier/--edits`` (the pipeline's models/...): those instead.

Then edits ``--images`` held-out faces (scikit-image's astronaut and LFW crops 1..) with both
conditionings at N steps (skip 0), one batch, and prints directional CLIP similarity (edit
strength), L1 / SSIM / PSNR to the source (fidelity), seconds per edit, and the mean / max
absolute difference between the two conditionings' edits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone-steps", type=int, default=300)
    p.add_argument("--edit-steps", type=int, default=40)
    p.add_argument("--steps", type=int, nargs="+", default=[50])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--attribute", default="smiling")
    p.add_argument("--backbone")
    p.add_argument("--rectifier")
    p.add_argument("--edits")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from dataclasses import replace

    from hfedit.models.clip import DirectionalClipLoss, RandomClipWarning, load_clip
    from hfedit.config import Conditioning, load_config
    from hfedit.evaluation.edits import evaluate_edit
    from hfedit.editing.editor import Editor
    from tests.conftest import briefly_trained, real_faces

    cfg = load_config()
    attr = cfg.edits.attributes[args.attribute]
    faces = real_faces(9 + 64)
    held_out, train = faces[:args.images], faces[9:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomClipWarning)
        clip = load_clip(cfg.clip)
    started = time.perf_counter()
    if args.backbone:
        from hfedit.models.backbone import load_backbone
        from hfedit.models.checkpoint import load_rectifier

        denoiser = load_backbone(args.backbone)
        rect, _ = load_rectifier(Path(args.edits) / args.attribute, denoiser.unet)
        origin = f"{args.backbone}, {args.edits}/{args.attribute}"
    else:
        from hfedit.training.edits import train_edit
        from hfedit.models.rectifier import build_rectifier

        denoiser = briefly_trained(cfg.backbone, train, args.backbone_steps)
        torch.manual_seed(cfg.pretrain.seed)
        recon = build_rectifier(cfg.rectifier, denoiser.unet)
        rect = train_edit(replace(attr, steps=args.edit_steps), denoiser, recon, clip,
                          train).rectifier.eval()
        origin = (f"tiny backbone trained {args.backbone_steps} steps, '{args.attribute}' rectifier "
                  f"trained {args.edit_steps} steps (Algorithm 1)")
    trained_s = time.perf_counter() - started
    direction = DirectionalClipLoss(clip, attr.source, attr.target)
    seeds = list(range(args.images))
    print(f"{origin} ({trained_s:.0f} s); CLIP {cfg.clip.model} "
          f"({'semantic' if clip.semantic else 'random weights'}); {args.images} held-out faces; "
          f"{args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f}")
    print(f"{'N':>4} {'conditioning':<13}{'CLIP dir':>10}{'L1':>9}{'SSIM':>8}{'PSNR':>8}{'s/edit':>8}"
          f"   |traj - live| mean / max")
    for n in args.steps:
        editor = Editor(denoiser, replace(cfg.inversion, num_steps=n), {args.attribute: rect})
        evs, secs = {}, {}
        for c in Conditioning:
            start = time.perf_counter()
            evs[c] = evaluate_edit(editor, args.attribute, held_out, seeds, direction,
                                   batch_size=args.images, condition=c)
            secs[c] = (time.perf_counter() - start) / args.images
        diff = (evs[Conditioning.trajectory].edited - evs[Conditioning.live].edited).abs()
        for c, ev in evs.items():
            m = ev.summary()
            extra = f"   {diff.mean():.1e} / {diff.max():.1e}" if c is Conditioning.trajectory else ""
            print(f"{n:>4} {c.value:<13}{m['clip_direction']:>+10.4f}{m['l1']:>9.4f}{m['ssim']:>8.4f}"
                  f"{m['psnr']:>8.2f}{secs[c]:>8.3f}{extra}")


if __name__ == "__main__":
    main()
