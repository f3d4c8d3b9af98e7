"""Where a rectifier's bytes go, and what sharing the trunk between edit rectifiers costs.

    .venv/bin/python benchmarks/rectifier_size.py [--backbone-steps 300] [--edit-steps 40] \
        [--steps 50] [--images 8]

1. The default rectifier (params.yaml's ``rectifier`` section) on the default tiny backbone:
   parameters and float32 bytes per part (trunk, time MLP, the per-target branch bank, heads).
2. An edit rectifier for ``smiling`` (params.yaml's settings, ``--edit-steps`` steps of
   Algorithm 1) trained twice from the same seeded reconstruction rectifier on a tiny backbone
   trained ``--backbone-steps`` steps on real faces: the whole rectifier trained (as before
   ``edits.share_trunk``) and with the trunk frozen (``share_trunk: true``). For each: the
   size of ``rectifier.safetensors`` as the pipeline writes it, seconds per training step, and
   the edit of ``--images`` held-out faces at N steps (directional CLIP, L1 / SSIM / PSNR).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parts(rect) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for name, p in rect.named_parameters():
        counts[name.split(".")[0]] += p.numel()
    return dict(counts.most_common())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone-steps", type=int, default=300)
    p.add_argument("--edit-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from hfedit.models.checkpoint import save_rectifier
    from hfedit.models.clip import DirectionalClipLoss, RandomClipWarning, load_clip
    from hfedit.config import load_config
    from hfedit.evaluation.edits import evaluate_edit
    from hfedit.training.edits import train_edit
    from hfedit.editing.editor import Editor
    from hfedit.models.rectifier import build_rectifier
    from tests.conftest import briefly_trained, real_faces

    cfg = load_config()
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} torch thread(s)")
    faces = real_faces(9 + 64)
    held_out, train = faces[:args.images], faces[9:]
    denoiser = briefly_trained(cfg.backbone, train, args.backbone_steps)
    torch.manual_seed(cfg.pretrain.seed)
    recon = build_rectifier(cfg.rectifier, denoiser.unet)

    counts = parts(recon)
    total = sum(counts.values())
    unet = sum(p.numel() for p in denoiser.unet.parameters())
    print(f"rectifier ({cfg.rectifier.trunk.value} trunk, {recon.num_targets} target convs, "
          f"branch_channels {cfg.rectifier.branch_channels}): {total:,} parameters, "
          f"{total * 4 / 1e6:.1f} MB float32 ({total / unet:.0f}x the {unet:,}-parameter backbone)")
    for name, n in counts.items():
        print(f"  {name:<14}{n:>12,}{n * 4 / 1e6:>8.1f} MB{n / total:>7.1%}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomClipWarning)
        clip = load_clip(cfg.clip)
    attr = replace(cfg.edits.attributes["smiling"], steps=args.edit_steps)
    direction = DirectionalClipLoss(clip, attr.source, attr.target)
    tmp = Path(tempfile.mkdtemp(prefix="size-"))
    save_rectifier(tmp / "rectifier", recon)
    print(f"\nsmiling, {args.edit_steps} steps; {args.images} held-out faces, N = {args.steps}")
    print(f"{'edit training':<22}{'file MB':>9}{'s/step':>8}{'CLIP dir':>10}{'L1':>8}{'SSIM':>8}"
          f"{'PSNR':>8}")
    for share in (False, True):
        result = train_edit(attr, denoiser, recon, clip, train, share_trunk=share)
        folder = tmp / "edits" / ("shared" if share else "full")
        save_rectifier(folder, result.rectifier, base=tmp / "rectifier" if share else None)
        size = (folder / "rectifier.safetensors").stat().st_size / 1e6
        editor = Editor(denoiser, replace(cfg.inversion, num_steps=args.steps),
                        {"smiling": result.rectifier})
        m = evaluate_edit(editor, "smiling", held_out, list(range(args.images)), direction,
                          batch_size=args.images).summary()
        label = "trunk shared (frozen)" if share else "whole rectifier"
        print(f"{label:<22}{size:>9.1f}{result.seconds_per_step:>8.2f}{m['clip_direction']:>+10.4f}"
              f"{m['l1']:>8.4f}{m['ssim']:>8.4f}{m['psnr']:>8.2f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
