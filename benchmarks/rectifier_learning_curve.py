"""Learning curve of reconstruction pretraining on images the backbone never saw.

    .venv/bin/python benchmarks/rectifier_learning_curve.py --minutes 8

The paper's rectifier corrects a backbone on images that backbone was not trained on. This
script builds that setting from the bundled faces as prepare does (:func:`hfedit.data.manifest.split_roles`,
``--val`` and ``--rectifier`` shares as ``data.val_fraction`` / ``data.rectifier_fraction``: the
default profile's faces), a tiny backbone is
trained here on the backbone faces only (``--backbone-steps``), and for each learning rate in
``--lrs`` a fresh rectifier is pretrained (the stage's noise-fitting loss, Adam, weight decay
1e-5) on the rectifier faces with :func:`hfedit.training.augment.augment` (``pretrain.augment``'s default)
on every batch. Every
``--every`` steps it prints, on the held-out eval faces: the DDIM reconstruction L1 at
``--n`` steps, the noise gap and PDAE's posterior-mean gap, each beside the backbone's and as
a relative change (negative = the rectifier helps). Stops at ``--steps`` or ``--minutes``.
The goal this measures: held-out DDIM L1 and posterior gap >= 3% lower with the rectifier.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val", type=float, default=0.2, help="data.val_fraction: the eval faces")
    ap.add_argument("--rectifier", type=float, default=0.3,
                    help="data.rectifier_fraction: the rectifier's faces")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lrs", default="1e-3,3e-4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--trunk", default="resnet18", choices=["resnet18", "resnet34"])
    ap.add_argument("--n", type=int, default=50, help="DDIM steps of the held-out reconstruction")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hfedit.training.backbone import train_backbone
    from hfedit.config import HfeditConfig, RectifierConfig, RectifierTrunk
    from hfedit.data.sources import bundled_images
    from hfedit.data.manifest import split_roles
    from hfedit.data.images import to_tensor
    from hfedit.evaluation import metrics as M
    from hfedit.evaluation.reconstruction import (
        _model,
        noise_mse,
        posterior_mean_gaps,
    )
    from hfedit.diffusion.inversion import ddim_invert, ddim_sample
    from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier
    from hfedit.training.augment import Augmentation, augment
    from hfedit.training.reconstruction import (
        ReconstructionObjective,
        make_optimizer,
        reconstruction_step,
    )

    started = time.perf_counter()
    deadline = started + 60 * args.minutes
    faces = {i: to_tensor(img, 32) for i, img in bundled_images()}
    roles = dict(zip(("backbone", "rectifier", "eval"),
                     split_roles(list(faces), args.val, args.rectifier, args.seed)))
    part = {r: torch.stack([faces[i] for i in ids]) for r, ids in roles.items()}
    cfg = HfeditConfig().backbone
    cfg.train.steps, cfg.train.checkpoint_every = args.backbone_steps, 10**6
    with tempfile.TemporaryDirectory() as tmp:
        denoiser = train_backbone(cfg, part["backbone"], tmp, show_progress=False).denoiser
    held = part["eval"]
    print(f"faces: backbone {len(roles['backbone'])}, rectifier {len(roles['rectifier'])}, "
          f"eval {len(roles['eval'])} (disjoint, split_roles seed {args.seed}); backbone "
          f"trained {args.backbone_steps} steps on its faces in {time.perf_counter() - started:.0f} s")

    def scores(rect) -> dict[str, float]:
        with torch.no_grad():
            model = _model(denoiser, rect, held)
            x = ddim_sample(model, denoiser.schedule,
                            ddim_invert(model, denoiser.schedule, held, args.n).xts[0], args.n)
        rec = {"l1": float(M.l1(held, x.clamp(-1, 1)).mean())}
        gap = float(noise_mse(denoiser, held, rect, num_t=20).mean())
        rows = posterior_mean_gaps(denoiser, held, [args.n], rect)  # backbone row first
        pmg = rows[-1]["mean"]  # the rectified model's (the backbone's when rect is None)
        return {"l1": rec["l1"], "gap": gap, "pmg": pmg}

    base = scores(None)
    print(f"backbone on the eval faces: DDIM L1 {base['l1']:.5f} (N={args.n}), noise gap "
          f"{base['gap']:.5f}, posterior-mean gap {base['pmg']:.3e}")
    print(f"| lr | step | DDIM L1 | change | noise gap | change | posterior-mean gap | change | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    T = denoiser.schedule.num_train_timesteps
    for lr in (float(v) for v in args.lrs.split(",")):
        torch.manual_seed(0)
        rect = build_rectifier(RectifierConfig(trunk=RectifierTrunk(args.trunk)), denoiser.unet)
        objective = ReconstructionObjective(ModulatedDenoiser(denoiser, rect), "noise")
        opt, _ = make_optimizer(rect, lr, 1e-5, 10**9, 1.0)
        gen = torch.Generator().manual_seed(1)
        aug_gen = torch.Generator().manual_seed(2)
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, part["rectifier"].shape[0], (args.batch_size,), generator=gen)
            batch = augment(part["rectifier"][idx], Augmentation(), aug_gen)
            reconstruction_step(objective, opt, batch, gen, T)
            last = step == args.steps or time.perf_counter() > deadline
            if step % args.every == 0 or last:
                rect.eval()
                s = scores(rect)
                rect.train()
                print(f"| {lr:g} | {step} | {s['l1']:.5f} | {s['l1'] / base['l1'] - 1:+.2%} | "
                      f"{s['gap']:.5f} | {s['gap'] / base['gap'] - 1:+.2%} | {s['pmg']:.3e} | "
                      f"{s['pmg'] / base['pmg'] - 1:+.2%} | {time.perf_counter() - t0:.0f} |",
                      flush=True)
            if last:
                break
        if time.perf_counter() > deadline:
            print(f"stopped at the {args.minutes} min budget")
            break
    print(f"total {time.perf_counter() - started:.0f} s, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
