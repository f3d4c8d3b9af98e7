"""Algorithm 1 at large t: what the unclamped objective does, and what each remedy changes.

    .venv/bin/python benchmarks/edit_large_t.py                      # tiny backbone trained here
    .venv/bin/python benchmarks/edit_large_t.py --backbone models/backbone

In Algorithm 1 ``x0_edit = P_t[eps~] = (x_t - sqrt(1-abar_t) eps~) / sqrt(abar_t)``: the edit
rectifier's noise error ``eps~ - eps`` reaches x0_edit multiplied by ``sqrt(1-abar_t) /
sqrt(abar_t)`` (0.01 at t = 0, 1 at t ~ 250, ~158 at t = 999 for the linear schedule). So at
large t CLIP sees images far outside [-1, 1], and the gradient of both loss terms with respect
to the rectifier is scaled by the same factor. For t buckets this prints, per remedy
(``edits.attributes.<a>.large_t``: none = the paper as written, clamp, weight):

* ``|x0_edit|max`` and ``out``: the largest |value| CLIP is given and the fraction of its
  pixels outside [-1, 1] (for ``clamp`` CLIP sees the clamped image: 1.0 and 0 by construction,
  so the columns show the unclamped x0_edit);
* ``grad``: the norm of the loss gradient with respect to the rectifier's parameters, mean over
  ``--repeats`` draws of eps, on a batch of ``--batch`` real faces at that t;
* ``share``: the bucket's share of the summed gradient norm over all buckets (t is uniform in
  Algorithm 1, so this is the share of the expected gradient each bucket contributes);
  ``range`` (t ~ U{0..t_max-1}) is ``none`` with every bucket >= t_max removed.

The edit rectifier is a stand-in for one in training: the untrained rectifier (Delta = 0) with
its offset heads perturbed by ``--perturb`` (so eps~ != eps). CLIP is ViT-S-32 with random
weights (offline): the directional loss is not semantic, but its gradient's scaling with t
is the point here. Prints a markdown table; docs/benchmarks.md quotes it with the machine and load.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="", help="a backbone folder; empty: train a tiny one here")
    ap.add_argument("--backbone-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--perturb", type=float, default=0.05)
    ap.add_argument("--clip", default="ViT-S-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--buckets", default="0,100,200,300,400,500,600,700,800,900,999")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hfedit.models.backbone import load_backbone
    from hfedit.models.clip import DirectionalClipLoss, load_clip
    from hfedit.config import HfeditConfig, LargeT, RectifierConfig, RectifierTrunk, load_config
    from hfedit.training.edits import EditLoss, ScoreMatchingObjective
    from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier
    from tests.conftest import perturbed, real_faces

    started = time.perf_counter()
    if args.backbone:
        denoiser = load_backbone(args.backbone)
        faces = real_faces(args.batch, denoiser.sample_size)
    else:
        import tempfile

        from hfedit.training.backbone import train_backbone

        cfg = HfeditConfig().backbone
        cfg.train.steps, cfg.train.warmup_steps, cfg.train.checkpoint_every = (
            args.backbone_steps, 10, 10**6)
        with tempfile.TemporaryDirectory() as tmp:
            denoiser = train_backbone(cfg, real_faces(64), tmp, show_progress=False).denoiser
        faces = real_faces(args.batch)
    cfg = load_config(overrides=[f"clip.model={args.clip}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(cfg.clip)
    torch.manual_seed(0)
    rect = perturbed(build_rectifier(RectifierConfig(trunk=RectifierTrunk.resnet18,
                                                     branch_channels=16, time_embed_dim=32),
                                     denoiser.unet), args.perturb, seed=1)
    rect.requires_grad_(True)
    model = ModulatedDenoiser(denoiser, rect)
    loss = EditLoss(DirectionalClipLoss(clip, "a face", "a smiling face"))
    src = loss.source_embedding(faces)
    buckets = [int(t) for t in args.buckets.split(",")]
    remedies = [LargeT.none, LargeT.clamp, LargeT.weight]
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for remedy in remedies:
        objective = ScoreMatchingObjective(model, loss, remedy)
        for t in buckets:
            grads, peak, out = [], 0.0, 0.0
            for r in range(args.repeats):
                gen = torch.Generator().manual_seed(1000 * r + t)
                eps = torch.randn(faces.shape, generator=gen)
                tt = torch.full((faces.shape[0],), t, dtype=torch.long)
                rect.zero_grad(set_to_none=True)
                total, result = objective(faces, tt, eps, src)
                total.backward()
                grads.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in rect.parameters()
                                           if p.grad is not None)))
                x = result.x0_edit.detach()
                peak = max(peak, float(x.abs().max()))
                out += float((x.abs() > 1).float().mean()) / args.repeats
            rows[(remedy.value, t)] = {"grad": sum(grads) / len(grads), "peak": peak, "out": out}
    a = denoiser.schedule.alphas_cumprod
    print(f"Algorithm 1 at large t: batch {args.batch} real faces at {faces.shape[-1]} px, "
          f"{args.repeats} eps draws per t, rectifier perturbed {args.perturb}, CLIP {args.clip} "
          f"(random weights), backbone {'trained ' + str(args.backbone_steps) + ' steps here' if not args.backbone else args.backbone}; "
          f"{time.perf_counter() - started:.0f} s, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    head = "| t | sqrt(1-abar)/sqrt(abar) | |x0_edit|max | out of [-1,1] |"
    head += "".join(f" grad {r.value} | share {r.value} |" for r in remedies)
    print(head)
    print("|" + "---|" * (4 + 2 * len(remedies)))
    sums = {r.value: sum(rows[(r.value, t)]["grad"] for t in buckets) for r in remedies}
    for t in buckets:
        n = rows[("none", t)]
        amp = math.sqrt(1 - float(a[t])) / math.sqrt(float(a[t]))
        line = f"| {t} | {amp:.3g} | {n['peak']:.3g} | {n['out']:.3f} |"
        for r in remedies:
            g = rows[(r.value, t)]["grad"]
            line += f" {g:.3g} | {g / sums[r.value]:.3f} |"
        print(line)
    print()
    for r in remedies:
        g = [rows[(r.value, t)]["grad"] for t in buckets]
        top = sum(rows[(r.value, t)]["grad"] for t in buckets if t >= 800) / sums[r.value]
        print(f"{r.value:>6}: max/min bucket gradient {max(g) / max(min(g), 1e-12):.3g}, "
              f"share of buckets t >= 800: {top:.3f}")


if __name__ == "__main__":
    main()
