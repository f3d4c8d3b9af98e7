"""Seconds per edit step: a trajectory-conditioned edit vs a live-conditioned one vs a plain replay.

    .venv/bin/python benchmarks/replay.py [--batch 8] [--steps 20] [--repeats 3] [--threads 1]
    .venv/bin/python benchmarks/replay.py --backbone celebahq256 --batch 2 --steps 3 \
        --attributes 1 --repeats 1 --threads 2          # the paper's U-Net at 256 px

The default tiny backbone or the random-weight stand-in of google/ddpm-ema-celebahq-256's U-Net
(113.7M parameters, 256 px) (random weights: the cost is the architecture's) and the default
rectifier (ResNet34 trunk, branch_channels 64, heads perturbed so the offsets are not zero), B
images inverted once, then replayed over all N steps (skip 0):

  plain replay   the backbone alone (the reconstruction): one plain U-Net pass per step
  live           per step: plain pass for P_t, hypernetwork, modulated pass (reusing the plain
                 pass's down path); what every edit did before trajectory conditioning
  trajectory     one batched hypernetwork call over the N*B (step, image) pairs from the
                 inversion's kept estimates, then one modulated pass per step
  K x ...        the same with K attributes in one replay of K*B samples (per step and per
                 attribute: divide by K)

Each case's whole replay (hypernetwork included) divided by N; cases interleaved, the best of
``--repeats`` kept; ratios to the plain replay from this one run. Load average printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--attributes", type=int, default=3, help="K of the K x rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trunk", default="resnet34")
    p.add_argument("--backbone", choices=("tiny", "celebahq256"), default="tiny")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from hfedit.models.backbone import new_denoiser
    from hfedit.config import HfeditConfig, InversionConfig, RectifierTrunk
    from hfedit.editing.editor import Editor
    from hfedit.diffusion.inversion import replay
    from hfedit.models.rectifier import build_rectifier
    from tests.conftest import perturbed, real_faces

    cfg = HfeditConfig()
    torch.manual_seed(0)
    if args.backbone == "tiny":
        d, label = new_denoiser(cfg.backbone, 32).freeze(), "tiny backbone (32x32"
    else:
        from hfedit.testing import celebahq256_denoiser

        d = celebahq256_denoiser()
        label = "CelebA-HQ-256 stand-in (256x256"
    resolution = d.unet.config.sample_size
    cfg.rectifier.trunk = RectifierTrunk(args.trunk)
    base = build_rectifier(cfg.rectifier, d.unet).eval()
    rects = {f"a{k}": perturbed(base, 0.05, seed=k) for k in range(args.attributes)}
    x0 = real_faces(args.batch, resolution)
    seeds = list(range(args.batch))
    editor = Editor(d, InversionConfig(num_steps=args.steps), rects)
    inv = editor.invert(x0, seeds)
    one, many = ("a0",), tuple(rects)
    cases = {
        "plain replay": lambda: replay(d, d.schedule, inv),
        "live": lambda: editor.edit(x0, seeds, one, inversion=inv, condition="live"),
        "trajectory": lambda: editor.edit(x0, seeds, one, inversion=inv, condition="trajectory"),
    }
    if args.attributes > 1:
        cases[f"{args.attributes} x live"] = lambda: editor.edit(x0, seeds, many, inversion=inv,
                                                                  condition="live")
        cases[f"{args.attributes} x trajectory"] = lambda: editor.edit(
            x0, seeds, many, inversion=inv, condition="trajectory")
    best = {k: float("inf") for k in cases}
    loads = []
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in cases.items():
                loads.append(os.getloadavg()[0])
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    # the hypernetwork's share of a trajectory edit: its one batched call alone
    from hfedit.editing.joint import JointRectifier

    hyper = float("inf")
    with torch.no_grad():
        for _ in range(args.repeats):
            start = time.perf_counter()
            JointRectifier(d, [rects["a0"]], x0).window(inv, range(inv.num_steps))
            hyper = min(hyper, time.perf_counter() - start)

    plain = best["plain replay"] / args.steps
    print(f"{label}, {sum(q.numel() for q in d.unet.parameters()) / 1e6:.2f}M), "
          f"rectifier {args.trunk}, B = {args.batch}, N = {args.steps}, {args.threads} torch "
          f"thread(s), best of {args.repeats}; {cpu_name()}, {os.cpu_count()} CPUs, load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'case':<18}{'ms/step':>10}{'x plain':>9}{'ms/step/attr':>14}{'x plain':>9}")
    for name, total in best.items():
        k = args.attributes if " x " in name else 1
        per = total / args.steps * 1e3
        print(f"{name:<18}{per:>10.1f}{per / plain / 1e3:>9.2f}{per / k:>14.1f}"
              f"{per / k / plain / 1e3:>9.2f}")
    print(f"trajectory's batched hypernetwork call ({args.steps * args.batch} pairs): "
          f"{hyper * 1e3:.0f} ms = {hyper / args.steps * 1e3:.1f} ms/step "
          f"({hyper / args.steps / plain:.2f}x plain)")


if __name__ == "__main__":
    main()
