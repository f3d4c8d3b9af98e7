"""Profile of the paper's setting on one device: the CelebA-HQ-256 U-Net stand-in at 256 px.

    .venv/bin/python benchmarks/gpu_profile.py                   # a GPU: the full table (< 8 min)
    .venv/bin/python benchmarks/gpu_profile.py --device cpu      # the CPU: the same rows, smaller
    .venv/bin/python benchmarks/gpu_profile.py --device cpu --resolution 64 --json out.json

Rows, each under every precision of ``--precisions`` (default fp32 and bf16):
  * plain U-Net forward at B = 1 / 8 / 32 (CPU: 1 / 2);
  * modulated pass (given random offsets) and the whole rectified step (plain pass for P_t +
    hypernetwork + modulated pass), no gradients, at B = 8 (CPU: 2);
  * an edit-training step (the paper's Algorithm 1: score matching, CLIP ViT-B-32 directional
    loss + L1, backward, Adam) at B = 4 and 8 (CPU: 1), with and without activation
    checkpointing of the modulated blocks;
  * edit-friendly inversion + one edit of a batch of 8 images at N = 50 (CPU: 2 images, N = 4),
    per image, and the reconstruction's max error (exact under every precision).
Columns: median milliseconds over ``--repeats`` runs after one warm-up; peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during the case (weights, optimiser state and activations:
what must fit on the card); on the CPU the growth of the peak resident set over the case
(VmHWM reset through /proc/self/clear_refs). Training rows add the activation memory autograd
keeps for backward (hfedit.training.memory.saved_for_backward: the same on every device).

Weights are random (the stand-in of google/ddpm-ema-celebahq-256 and of CLIP ViT-B-32): speed
and memory are those of the real models, nothing else. Everything runs in this one process;
``--json`` writes the rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rectifier import _status_mb, print_table, random_factors, sync  # noqa: E402
from hfedit.models.backbone import Denoiser  # noqa: E402
from hfedit.testing import celebahq256_denoiser
from hfedit.config import InversionConfig, RectifierConfig  # noqa: E402
from hfedit.device import Precision, resolve_device  # noqa: E402
from hfedit.training.memory import saved_for_backward  # noqa: E402

# Sizes per device type: a GPU runs the paper's sizes, the CPU the same rows smaller.
SIZES = {
    "cuda": {"plain": (1, 8, 32), "batch": 8, "train": (4, 8), "edit_images": 8, "steps": 50},
    "cpu": {"plain": (1, 2), "batch": 2, "train": (1,), "edit_images": 2, "steps": 4},
}


def build(device: torch.device, resolution: int):
    """The stand-in backbone, a rectifier with nonzero offsets, random-weight CLIP ViT-B-32."""
    import open_clip

    from hfedit.models.clip import ClipModel
    from hfedit.models.rectifier import Rectifier

    denoiser = celebahq256_denoiser(device=device, sample_size=resolution)
    torch.manual_seed(0)
    rectifier = Rectifier(RectifierConfig(), denoiser.unet).to(device)
    with torch.no_grad():  # nonzero offsets, as after training
        for head in rectifier.head_a:
            head.weight.normal_(0.0, 0.02)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    clip = ClipModel(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32", False,
                     "random weights (profile only)").to(device)
    return denoiser, rectifier, clip


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB) of ``fn`` after one warm-up run."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS: growth shows
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (Linux)
            f.write("5")
        base = _status_mb("VmRSS")
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else _status_mb("VmHWM") - base)
    return statistics.median(times), peak


def rows_for(denoiser: Denoiser, rectifier, clip, device: torch.device, precision: Precision,
             sizes: dict, resolution: int, repeats: int) -> list[dict]:
    from hfedit.models.clip import DirectionalClipLoss
    from hfedit.training.edits import EditLoss, ScoreMatchingObjective, edit_step_score_matching
    from hfedit.editing.editor import Editor
    from hfedit.models.rectifier import ModulatedDenoiser, modulated_eps

    denoiser.precision = precision
    gen = torch.Generator().manual_seed(0)
    images = lambda b: (torch.rand(b, 3, resolution, resolution, generator=gen) * 2 - 1).to(device)  # noqa: E731
    rows = []

    def add(case: str, batch: int, fn, per: int = 1, **extra) -> None:
        ms, peak = measure(fn, device, repeats)
        rows.append({"case": case, "B": batch, "precision": precision.value,
                     "ms": ms / per, "peak_mib": peak, **extra})
        print(f"  {case:<40} B={batch:<3} {precision.value}: {ms / per:10.1f} ms  "
              f"{peak:8.0f} MiB", flush=True)

    t = torch.full((max(sizes["plain"]),), 500, device=device)
    with torch.no_grad():
        for b in sizes["plain"]:
            x = images(b)
            add("plain U-Net forward", b, lambda x=x, b=b: denoiser(x, t[:b]))
        b = sizes["batch"]
        x, x0 = images(b), images(b)
        factors = random_factors(rectifier, b, device, grad=False)
        add("modulated pass", b, lambda: modulated_eps(denoiser, factors, x, t[:b]))
        md = ModulatedDenoiser(denoiser, rectifier)
        add("rectified step (plain + hyper + modulated)", b, lambda: md.step(x, t[:b], x0))

    loss = EditLoss(DirectionalClipLoss(clip, "a face", "a smiling face"))
    for b in sizes["train"]:
        for checkpoint in (False, True):
            rect = copy.deepcopy(rectifier).train()
            objective = ScoreMatchingObjective(ModulatedDenoiser(denoiser, rect, checkpoint=checkpoint),
                                               loss)
            opt = torch.optim.Adam(rect.parameters(), lr=1e-3)
            x0 = images(b)
            step_gen = torch.Generator().manual_seed(1)
            T = denoiser.schedule.num_train_timesteps
            with saved_for_backward(denoiser, rect, clip) as saved:
                edit_step_score_matching(objective, opt, x0, step_gen, T)
            add(f"edit-training step{' (checkpointed)' if checkpoint else ''}", b,
                lambda: edit_step_score_matching(objective, opt, x0, step_gen, T),
                activations_mib=saved.bytes / 2**20)
            del rect, objective, opt

    n, b = sizes["steps"], sizes["edit_images"]
    editor = Editor(denoiser, InversionConfig(num_steps=n), {"edit": rectifier})
    x0 = images(b)
    result = {}

    def invert_and_edit():
        result["batch"] = editor.edit(x0, list(range(b)), names=("reconstruction", "edit"))

    add(f"EF inversion + edit, N={n}, per image", b, invert_and_edit, per=b)
    rec = result["batch"].outputs["reconstruction"]
    rows[-1]["max_error"] = float((rec - x0).abs().max())
    return rows


def profile(device: torch.device, resolution: int, precisions: list[Precision], steps: int = 0,
            repeats: int = 0) -> list[dict]:
    """Every row of the table (see the module doc) on ``device``."""
    sizes = dict(SIZES["cuda" if device.type == "cuda" else "cpu"])
    sizes["steps"] = steps or sizes["steps"]
    repeats = repeats or (5 if device.type == "cuda" else 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_profile: {name}, {resolution} px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, sizes {sizes}", flush=True)
    denoiser, rectifier, clip = build(device, resolution)
    rows = []
    for precision in precisions:
        rows += rows_for(denoiser, rectifier, clip, device, precision, sizes, resolution, repeats)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    ap.add_argument("--resolution", type=int, default=256,
                    help="image size (the stand-in's architecture is unchanged)")
    ap.add_argument("--repeats", type=int, default=0, help="timed runs per case (0: 5 GPU, 1 CPU)")
    ap.add_argument("--steps", type=int, default=0, help="N of the edit row (0: 50 GPU, 4 CPU)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    rows = profile(device, args.resolution, [Precision(p.strip()) for p in args.precisions.split(",")],
                   args.steps, args.repeats)
    seconds = time.perf_counter() - started
    print()
    print_table([(r["case"], r["B"], r["precision"], f"{r['ms']:.1f}", f"{r['peak_mib']:.0f}",
                  f"{r['activations_mib']:.0f}" if "activations_mib" in r else "",
                  f"{r['max_error']:.1e}" if "max_error" in r else "") for r in rows],
                ("case", "B", "precision", "ms", "peak MiB", "activations MiB", "max error"))
    print(f"\n{name}; {seconds:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "resolution": args.resolution,
                                         "seconds": seconds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
