"""Torch threads and OpenMP's wait policy when processes share the CPU: steps/s of the default
profile's backbone training (the tiny U-Net, batch 16 at 32 px: many short parallel regions)
alone and as two processes at once, under each ``OMP_WAIT_POLICY`` and thread count.

Two processes of 2 threads on 2 cores is what a stage beside a Ray worker, or the test suite
beside a stage, looks like. With OpenMP's default (active) policy a thread that reaches a
barrier first spins for its peer, which the other process may hold off the core.

    .venv/bin/python benchmarks/threads.py --steps 60
    .venv/bin/python benchmarks/threads.py --steps 60 --threads-list 2 --spincount 1000 10000 100000

``--spincount`` adds rows with the policy unset and ``GOMP_SPINCOUNT`` set (how long libgomp's
threads spin at a barrier before they sleep; its default is 300,000 spins, and PASSIVE is 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(steps: int, threads: int) -> None:
    """One process: ``steps`` backbone training steps on random images; prints JSON."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    from hfedit.config import load_config
    from hfedit.training.backbone import train_backbone

    torch.set_num_threads(threads)
    full = load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf")
    cfg, size = full.backbone, full.data.resolution
    cfg.train.steps = steps
    cfg.train.checkpoint_every = 10**9
    images = torch.rand(64, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with tempfile.TemporaryDirectory() as ckpt:
        start = time.perf_counter()
        train_backbone(cfg, images, ckpt, show_progress=False)
        print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start)}))


def run(steps: int, threads: int, policy: str | None, copies: int) -> list[float]:
    """``policy``: an ``OMP_WAIT_POLICY`` value, ``spin=N`` (``GOMP_SPINCOUNT=N``, the policy
    unset) or None (both unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy and policy.startswith("spin="):
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin=")
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--steps", str(steps),
                               "--threads", str(threads)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threads-list", type=int, nargs="+", default=[2, 1],
                    help="torch thread counts to compare")
    ap.add_argument("--spincount", type=int, nargs="*", default=[],
                    help="GOMP_SPINCOUNT values to add, with OMP_WAIT_POLICY unset")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.steps, args.threads)
    print(f"{'processes':>9}  {'threads':>7}  {'policy':>15}  steps/s per process")
    for copies in (1, 2):
        for threads in args.threads_list:
            for policy in (None, "PASSIVE", *(f"spin={n}" for n in args.spincount)):
                rates = run(args.steps, threads, policy, copies)
                print(f"{copies:>9}  {threads:>7}  {policy or '(default)':>15}  "
                      + ", ".join(f"{r:.2f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
