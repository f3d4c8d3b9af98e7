"""Cost of edit-friendly inversion and replay against bare denoiser calls.

    .venv/bin/python benchmarks/inversion.py [--backbone models/backbone] [--batch 8] [--steps 10 50 100]

Prints, per N: model evaluations per inversion and per edit (must be N and N - skip), seconds
per image for inversion and for replay, and the ratio of the inversion's wall time to N bare
denoiser calls on the same batch (goal <= 1.10). Uses the pipeline's backbone when it exists,
else a random-weight backbone of the default architecture (the cost is the same).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hfedit.models.backbone import Denoiser, load_backbone, new_denoiser
from hfedit.config import load_config
from hfedit.diffusion.inversion import invert, replay


class Counting:
    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.denoiser(x, t)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if Path(args.backbone).exists():
        denoiser = load_backbone(args.backbone)
    else:
        print(f"({args.backbone} not found: random-weight backbone of the default architecture)")
        cfg = load_config()
        denoiser = new_denoiser(cfg.backbone, cfg.data.resolution).freeze()
    res = denoiser.sample_size
    x0 = torch.rand(args.batch, 3, res, res) * 2 - 1
    print(f"backbone {denoiser.source}, {res}px, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads, device cpu")
    header = f"{'N':>4} {'skip':>4} {'evals inv':>9} {'evals edit':>10} {'inv s/img':>9} " \
             f"{'edit s/img':>10} {'bare N calls s':>14} {'inv / bare':>10}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        denoiser(x0, 500)  # warm-up
        for n in args.steps:
            skip = n // 3
            counter = Counting(denoiser)
            inv = invert(counter, denoiser.schedule, x0, n)
            evals_inv, counter.calls = counter.calls, 0
            replay(counter, denoiser.schedule, inv, skip=skip)
            evals_edit = counter.calls
            ts = denoiser.schedule.timesteps(n)
            bare = best_of(lambda: [denoiser(x0, t) for t in ts], args.repeats)
            t_inv = best_of(lambda: invert(denoiser, denoiser.schedule, x0, n), args.repeats)
            t_edit = best_of(lambda: replay(denoiser, denoiser.schedule, inv, skip=skip), args.repeats)
            print(f"{n:>4} {skip:>4} {evals_inv:>9} {evals_edit:>10} {t_inv / args.batch:>9.4f} "
                  f"{t_edit / args.batch:>10.4f} {bare:>14.3f} {t_inv / bare:>10.3f}")


if __name__ == "__main__":
    main()
