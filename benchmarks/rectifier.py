"""Cost of the rectifier: modulated U-Net pass, the whole rectified step, the three modulation
paths, and peak memory of a training step.

    .venv/bin/python benchmarks/rectifier.py                      # tiny backbone, B=1 and B=8
    .venv/bin/python benchmarks/rectifier.py --trunk resnet18     # the cheaper hypernetwork
    .venv/bin/python benchmarks/rectifier.py --profile celebahq256 --batch-sizes 1 --resolution 128

Times are the best of interleaved runs: rounds go over every case, each case running ~0.2 s per
round, so load from other processes hits every case alike (the shared 2-core machine this was
written on often has a load average of 2-20). One torch thread by default: two OpenMP threads
contending with other jobs gave 2-10x outliers. Cases:
  * "plain fwd": the frozen backbone's forward (``torch.no_grad``);
  * "plain train": an ordinary DDPM training step of the backbone (fwd + bwd, weights trainable);
  * "modulated <path>": one backbone pass with per-sample kernels from fixed random factors;
    fwd+bwd backpropagates into the factors only (the backbone stays frozen);
  * "hypernetwork fwd": the rectifier alone;
  * "rectified step": plain pass for P_t (no grad) + hypernetwork + modulated pass, as training
    and editing run it (fwd+bwd: into the rectifier's parameters), with and without reusing the
    plain pass's down path.
Memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the peak resident
set (VmHWM, reset through /proc/self/clear_refs) over one step, each case in a fresh subprocess
(torch has no CPU peak counter; tracemalloc does not see torch's allocator).

One run (1 thread, idle 2-core AMD EPYC, load average 1.1, 2026-11-30; tiny backbone,
resnet34 trunk, branch_channels 64); ratios to "plain fwd" (fwd) or "plain train" (fwd+bwd):

                          B=1 fwd  B=1 fwd+bwd  B=8 fwd  B=8 fwd+bwd
    plain (ms)               6.1      17.5        26.9      80.0
    modulated grouped       1.19x     1.03x       1.23x    1.20x
    modulated loop          1.19x     1.01x       1.70x    1.67x
    modulated lowrank       2.54x     2.59x       2.90x    3.07x
    hypernetwork alone      2.25x       -         0.82x      -
    rectified step          4.71x     5.07x       3.01x    2.69x
    B=8 step memory: plain train 87 MB, modulated grouped 97, loop 106, lowrank 116 MB;
    rectifier train step (incl. Adam) 488 MB.
The rectified step is two U-Net passes plus the hypernetwork; on the tiny 32x32 U-Net the
ResNet34 trunk costs 0.8x (B=8) to 2.3x (B=1) a U-Net pass, so the 2.5x goal is missed here.
On the CelebA-HQ-256 U-Net the hypernetwork is 0.01-0.02x a pass (``benchmarks/replay.py
--backbone celebahq256``, B=8, 256 px on this CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfedit.models.backbone import Denoiser, new_denoiser  # noqa: E402
from hfedit.config import HfeditConfig, ModulationMode, RectifierConfig, RectifierTrunk  # noqa: E402
from hfedit.models.modulation import ConvFactors, resolve_mode  # noqa: E402
from hfedit.models.rectifier import ModulatedDenoiser, Rectifier, modulated_eps, rectified_step  # noqa: E402
from hfedit.diffusion.schedule import Schedule, q_sample  # noqa: E402

PATHS = ("grouped", "loop", "lowrank")


# ------------------------------------------------------------------------------------ models
def build(profile: str, device: torch.device,
          cfg: RectifierConfig = RectifierConfig()) -> tuple[Denoiser, Rectifier, int]:
    torch.manual_seed(0)
    if profile == "tiny":
        denoiser, res = new_denoiser(HfeditConfig().backbone, 32), 32
    elif profile == "celebahq256":
        from hfedit.testing import celebahq256_unet

        denoiser, res = Denoiser(celebahq256_unet(), Schedule.linear(), "celebahq256-random"), 256
    else:
        raise SystemExit(f"--profile {profile!r}: choose tiny or celebahq256")
    denoiser = denoiser.to(device).freeze()
    rectifier = Rectifier(cfg, denoiser.unet).to(device)
    with torch.no_grad():  # nonzero offsets, so no path can shortcut
        for head in rectifier.head_a:
            head.weight.normal_(0.0, 0.02)
    return denoiser, rectifier, res


def random_factors(rectifier: Rectifier, bsz: int, device, grad: bool) -> dict[str, ConvFactors]:
    out = {}
    for name, (co, ci, kh, kw) in zip(rectifier.target_names, rectifier.kernel_shapes):
        a = (0.05 * torch.randn(bsz, kh, kw, ci, device=device)).requires_grad_(grad)
        b = (0.05 * torch.randn(bsz, kh, kw, co, device=device)).requires_grad_(grad)
        out[name] = ConvFactors(a, b)
    return out


def make_cases(denoiser: Denoiser, rectifier: Rectifier, bsz: int, res: int,
               device) -> dict[str, Callable[[], None]]:
    """name -> a closure running the case once."""
    x0 = torch.rand(bsz, 3, res, res, device=device) * 2 - 1
    t = torch.randint(0, 1000, (bsz,), device=device)
    x_t = q_sample(denoiser.schedule, x0, t, torch.randn_like(x0))
    f_nograd = random_factors(rectifier, bsz, device, grad=False)
    f_grad = random_factors(rectifier, bsz, device, grad=True)
    unet_params = list(denoiser.unet.parameters())

    def plain_fwd():
        with torch.no_grad():
            denoiser(x_t, t)

    def plain_train():
        for p in unet_params:
            p.requires_grad_(True)
        denoiser(x_t, t).square().mean().backward()
        for p in unet_params:
            p.requires_grad_(False)
            p.grad = None

    cases = {"plain fwd": plain_fwd, "plain train": plain_train}
    for path in PATHS:
        def fwd(path=path):
            with torch.no_grad():
                modulated_eps(denoiser, f_nograd, x_t, t, path)

        def fwd_bwd(path=path):
            modulated_eps(denoiser, f_grad, x_t, t, path).square().mean().backward()

        cases[f"modulated {path} fwd"] = fwd
        cases[f"modulated {path} fwd+bwd"] = fwd_bwd

    def step_fwd():
        with torch.no_grad():
            rectified_step(denoiser, rectifier, x_t, t, x0)

    def step_fwd_bwd():
        rectified_step(denoiser, rectifier, x_t, t, x0).eps_hat.square().mean().backward()
        rectifier.zero_grad(set_to_none=True)

    def step_fwd_noreuse():
        with torch.no_grad():
            rectified_step(denoiser, rectifier, x_t, t, x0, reuse_prefix=False)

    def hyper_fwd():
        with torch.no_grad():
            rectifier(x0, x_t, t)

    cases["hypernetwork fwd"] = hyper_fwd
    cases["rectified step fwd"] = step_fwd
    cases["rectified step fwd+bwd"] = step_fwd_bwd
    cases["rectified step fwd, no prefix reuse"] = step_fwd_noreuse
    return cases


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cases(cases: dict[str, Callable[[], None]], repeats: int, device,
               budget_s: float) -> dict[str, float]:
    """Best time (ms) per case. Rounds interleave the cases; within a round a case runs for
    about 0.2 s (at least once), so short cases get many samples. Stops after a round once
    ``budget_s`` is spent (a loaded machine)."""
    start = time.perf_counter()
    best = {}
    for name, fn in cases.items():  # warm-up (allocator, oneDNN primitive caches)
        fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best[name] = (time.perf_counter() - t0) * 1e3
    for r in range(repeats):
        if r >= 1 and time.perf_counter() - start > budget_s:
            print(f"(time budget spent after {r} of {repeats} rounds)")
            break
        for name, fn in cases.items():
            for _ in range(max(1, min(20, int(200 / best[name])))):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


# ------------------------------------------------------------------------------------ memory
MEMORY_CASES = ("plain train", *(f"modulated {p} fwd+bwd" for p in PATHS), "rectifier train")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_case(profile: str, case: str, bsz: int, res: int | None, device,
                cfg: RectifierConfig) -> float:
    """Peak extra memory (MB) of one step of ``case`` in this process (fresh on the CPU)."""
    denoiser, rectifier, default_res = build(profile, device, cfg)
    res = res or default_res
    x0 = torch.rand(bsz, 3, res, res, device=device) * 2 - 1
    t = torch.randint(0, 1000, (bsz,), device=device)
    x_t = q_sample(denoiser.schedule, x0, t, torch.randn_like(x0))
    if case == "plain train":  # an ordinary DDPM training step of the backbone
        params = list(denoiser.unet.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-4)

        def step():
            denoiser(x_t, t).square().mean().backward()
            opt.step()
    elif case == "rectifier train":  # rectified step + Adam on the rectifier (auto path)
        model = ModulatedDenoiser(denoiser, rectifier)
        opt = torch.optim.Adam(rectifier.parameters(), lr=1e-3, weight_decay=1e-5)

        def step():
            model(x_t, t, x0).square().mean().backward()
            opt.step()
    else:  # the modulated pass alone, gradients into fixed factors
        factors = random_factors(rectifier, bsz, device, grad=True)
        del rectifier

        def step():
            modulated_eps(denoiser, factors, x_t, t, case.split()[1]).square().mean().backward()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM), Linux >= 4.0
        f.write("5")
    base = _status_mb("VmRSS")
    step()
    return _status_mb("VmHWM") - base


def memory_table(args, device) -> dict[str, float]:
    bsz = max(args.batch_sizes)
    out = {}
    for case in MEMORY_CASES:
        if device.type == "cuda":
            out[case] = memory_case(args.profile, case, bsz, args.resolution, device, rect_cfg(args))
            continue
        cmd = [sys.executable, __file__, "--profile", args.profile, "--memory-case", case,
               "--batch-sizes", str(bsz), "--threads", str(torch.get_num_threads()),
               "--trunk", args.trunk, "--branch-channels", str(args.branch_channels)]
        if args.resolution:
            cmd += ["--resolution", str(args.resolution)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"memory case {case!r} failed:\n{done.stderr[-2000:]}")
        out[case] = json.loads(done.stdout.strip().splitlines()[-1])["mb"]
    return out


def rect_cfg(args) -> RectifierConfig:
    return RectifierConfig(trunk=RectifierTrunk(args.trunk), branch_channels=args.branch_channels)


# ------------------------------------------------------------------------------------- table
def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny", choices=["tiny", "celebahq256"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--resolution", type=int, default=None, help="input size (default: profile's)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). Default 1: on the shared 2-core "
                         "machine two OpenMP threads contending with other jobs gave 2-10x "
                         "outliers; one thread gives stable ratios")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trunk", default="resnet34", choices=["resnet18", "resnet34"])
    ap.add_argument("--branch-channels", type=int, default=RectifierConfig.branch_channels)
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="seconds of timing (all batch sizes) after which repeats stop")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tiny = args.profile == "tiny"
    args.batch_sizes = args.batch_sizes or ([1, 8] if tiny else [1])
    repeats = args.repeats or (4 if tiny else 2)

    if args.memory_case:  # child process of memory_table
        mb = memory_case(args.profile, args.memory_case, args.batch_sizes[0], args.resolution,
                         device, rect_cfg(args))
        print(json.dumps({"mb": mb}))
        return

    start = time.perf_counter()
    denoiser, rectifier, res = build(args.profile, device, rect_cfg(args))
    res = args.resolution or res
    n_rect = sum(p.numel() for p in rectifier.parameters()) / 1e6
    n_unet = sum(p.numel() for p in denoiser.unet.parameters()) / 1e6
    load = os.getloadavg()[0]
    print(f"profile={args.profile} device={device} threads={torch.get_num_threads()} "
          f"resolution={res} repeats={repeats} load_avg={load:.1f}")
    if device.type == "cpu" and load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} > {os.cpu_count()} cores: other processes "
              "compete for the CPU; timings will be noisy")
    print(f"backbone {n_unet:.1f}M params; rectifier {n_rect:.1f}M params "
          f"({rectifier.num_targets} target convs, trunk {rectifier.cfg.trunk.value}, "
          f"branch_channels {rectifier.cfg.branch_channels})\n")

    rows = []
    for bsz in args.batch_sizes:
        budget = args.budget_s / len(args.batch_sizes)
        ms = time_cases(make_cases(denoiser, rectifier, bsz, res, device), repeats, device, budget)
        fwd, train = ms["plain fwd"], ms["plain train"]
        for name, v in ms.items():
            ref = train if name.endswith("fwd+bwd") or name == "plain train" else fwd
            goal = ""
            if name.startswith("modulated") and name.endswith(" fwd"):
                goal = "<= 1.3"
            elif name in ("rectified step fwd", "rectified step fwd+bwd"):
                goal = "<= 2.5"
            rows.append((f"B={bsz}", name, f"{v:.1f}", f"{v / ref:.2f}x", goal))
        auto = resolve_mode(ModulationMode.auto).value
        best_f = min(PATHS, key=lambda p: ms[f"modulated {p} fwd"])
        best_fb = min(PATHS, key=lambda p: ms[f"modulated {p} fwd+bwd"])
        rows.append((f"B={bsz}", f"fastest: fwd {best_f}, fwd+bwd {best_fb}; auto -> {auto}",
                     "", "", ""))
    print_table(rows, ("batch", "case", "ms", "vs plain", "goal"))
    print("(ratios: fwd cases vs 'plain fwd', fwd+bwd cases vs 'plain train')")

    if not args.no_memory:
        bsz = max(args.batch_sizes)
        how = "max_memory_allocated" if device.type == "cuda" else "peak RSS growth, fresh process"
        print(f"\nPeak memory of one step, B={bsz} ({how}); 'train' cases include the Adam "
              "step (the rectifier's Adam state and grads are most of it):")
        mem = memory_table(args, device)
        print_table([(k, f"{v:.0f}", f"{v / mem['plain train']:.2f}x") for k, v in mem.items()],
                    ("case", "MB", "vs plain train"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
