"""What reconstruction pretraining of the rectifier can learn from the offline default's data.

    .venv/bin/python benchmarks/rectifier_fit.py --fit train --steps 300
    .venv/bin/python benchmarks/rectifier_fit.py --fit val --steps 300

Trains a fresh rectifier (the stage's loss and optimiser, one process) on a fixed set of faces
and prints, every ``--every`` steps, the change of the noise-fitting error ``||eps -
eps_model(x_t, t)||^2`` relative to the plain backbone, on the same fixed (t, eps) draws:

* ``--fit train``: fits the first ``--n`` faces of the backbone's own training split; "held
  out" is the first 8 val faces;
* ``--fit val``: fits the first ``--n`` val faces (images the backbone never saw); "held out" is
  the other val faces.

Needs ``models/backbone`` and ``data/prepared`` (``dvc repro backbone``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", choices=["train", "val"], default="val")
    ap.add_argument("--n", type=int, default=12, help="faces fitted")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--trunk", default="resnet18", choices=["resnet18", "resnet34"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", default="models/backbone")
    ap.add_argument("--data", default="data/prepared")
    args = ap.parse_args()

    from hfedit.models.backbone import load_backbone
    from hfedit.config import load_config
    from hfedit.data.prepared import load_split
    from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier
    from hfedit.training.reconstruction import (
        ReconstructionObjective,
        make_optimizer,
        reconstruction_step,
    )

    torch.set_num_threads(args.threads)
    cfg = load_config(overrides=[f"rectifier.trunk={args.trunk}"])
    denoiser = load_backbone(args.backbone)
    train, val = load_split(Path(args.data), "train"), load_split(Path(args.data), "val")
    if args.fit == "train":
        seen, held = train[: args.n], val[:8]
    else:
        if val.shape[0] <= args.n:
            raise SystemExit(f"--n {args.n}: the val split has only {val.shape[0]} faces")
        seen, held = val[: args.n], val[args.n:]
    torch.manual_seed(0)
    rectifier = build_rectifier(cfg.rectifier, denoiser.unet)
    objective = ReconstructionObjective(ModulatedDenoiser(denoiser, rectifier), cfg.pretrain.loss)
    opt, _ = make_optimizer(rectifier, args.lr, cfg.pretrain.weight_decay, 10**9, 1.0)
    T = denoiser.schedule.num_train_timesteps
    draws = torch.Generator().manual_seed(123)
    n_max = max(seen.shape[0], held.shape[0])
    ts = torch.randint(0, T, (8, n_max), generator=draws)
    noise = torch.randn((8, n_max) + tuple(seen.shape[1:]), generator=draws)

    @torch.no_grad()
    def relative_error(x: torch.Tensor) -> float:
        objective.eval()
        model = plain = 0.0
        for k in range(ts.shape[0]):
            eps = noise[k, : x.shape[0]]
            _, step = objective(x, ts[k, : x.shape[0]], eps)
            model += (step.eps_hat - eps).square().mean().item()
            plain += (step.eps_plain - eps).square().mean().item()
        objective.train()
        return model / plain - 1.0

    gen = torch.Generator().manual_seed(1)
    print(f"fit {args.n} {args.fit} faces ({'seen' if args.fit == 'train' else 'not seen'} by the "
          f"backbone), {args.trunk}, lr {args.lr}, batch {args.batch_size}")
    print(f"{'step':>6} {'fitted faces':>14} {'held-out faces':>15} {'s':>6}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, seen.shape[0], (args.batch_size,), generator=gen)
        reconstruction_step(objective, opt, seen[idx], gen, T)
        if step % args.every == 0 or step == args.steps:
            print(f"{step:>6} {relative_error(seen):>+13.2%} {relative_error(held):>+14.2%} "
                  f"{time.perf_counter() - start:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
