"""Cost of attribute editing: seconds per edit-training step (score matching vs Markovian) and
edited images per second.

    .venv/bin/python benchmarks/editing.py                       # pipeline models when present
    .venv/bin/python benchmarks/editing.py --clip-models ViT-S-32 ViT-B-32 --threads 1

Training cases (one optimisation step of :mod:`hfedit.training.edits` at the attribute's batch
size, CLIP with random weights, cost-identical to real ones):
  * "score matching": Algorithm 1, one rectified step (plain pass for P_t, hypernetwork,
    modulated pass) + CLIP forward/backward of the edited batch;
  * "markovian (n steps)": the modulated DDIM chain t0 -> 0 in ``edits.markovian.train_steps``
    rectified steps, backpropagated through all of them, + the same CLIP cost (the DDIM
    latents are computed once per image before training and are not part of a step);
  * "CLIP fwd+bwd alone": the directional loss's share of a step.
Editing cases (:class:`hfedit.editing.editor.Editor`, ``inversion`` settings, batch ``--edit-batch``):
  * "invert + edit": edit-friendly inversion with the backbone (N evaluations) + replay through
    the attribute's rectifier (N - skip rectified evaluations): a new image;
  * "edit (inverted)": one more attribute on an image already inverted (replay only).
Times are the minimum over ``--repeats`` runs, the cases interleaved round-robin so that load
from other processes hits every case alike. The models are the pipeline's (models/backbone,
models/rectifier) when they exist, else random ones of the configured architecture (the cost
is the same).

RESULTS, measured on the 2-core CPU (torch 2.14.1, --threads 1 as in the Ray tasks, load
average ~2.3), pipeline models (tiny 32x32 backbone, resnet34 rectifier, 24 targets), training
batch 4, editing batch 8, N = 50, skip 0:

    case                           s/step  vs score matching
    ViT-S-32: score matching        0.718              1.00x
    ViT-S-32: markovian (4 steps)   1.444              2.01x
    ViT-S-32: CLIP fwd+bwd alone    0.350              0.49x
    ViT-B-32: score matching        1.617              1.00x
    ViT-B-32: markovian (4 steps)   2.291              1.42x
    ViT-B-32: CLIP fwd+bwd alone    1.236              0.76x

    invert + edit      10.06 s/batch  0.80 images/s
    edit (inverted)     7.66 s/batch  1.04 images/s   (each further attribute)

A run during a load average of ~6 from other jobs gave 5-15x larger and inconsistent numbers;
compare only runs on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfedit.models.backbone import load_backbone, new_denoiser  # noqa: E402
from hfedit.models.clip import DirectionalClipLoss, RandomClipWarning, load_clip  # noqa: E402
from hfedit.config import ClipConfig, InversionConfig, load_config  # noqa: E402
from hfedit.diffusion.inversion import ddim_invert  # noqa: E402
from hfedit.training.edits import (
    EditLoss,
    MarkovianObjective,
    ScoreMatchingObjective,
    chain_timesteps,
    edit_rectifier_from,
    edit_step_markovian,
    edit_step_score_matching,
)
from hfedit.editing.editor import Editor  # noqa: E402
from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier  # noqa: E402
from hfedit.training.reconstruction import make_optimizer  # noqa: E402
from benchmarks.rectifier import print_table  # noqa: E402


def models(cfg, backbone: Path, rectifier: Path):
    from hfedit.models.checkpoint import load_rectifier

    if (backbone / "model_index.json").is_file():
        denoiser, where = load_backbone(backbone), str(backbone)
    else:
        denoiser, where = new_denoiser(cfg.backbone, cfg.data.resolution).freeze(), "random"
    if (rectifier / "rectifier.json").is_file():
        rect, _ = load_rectifier(rectifier, denoiser.unet)
        where += f", {rectifier}"
    else:
        torch.manual_seed(0)
        rect = build_rectifier(cfg.rectifier, denoiser.unet)
        where += ", random rectifier"
    return denoiser, rect, where


def time_cases(cases: dict[str, Callable[[], None]], repeats: int, budget_s: float) -> dict[str, float]:
    """Minimum seconds per case over up to ``repeats`` interleaved rounds (one warm-up)."""
    for fn in cases.values():
        fn()
    best = {k: float("inf") for k in cases}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def training_cases(cfg, denoiser, recon, clip_model: str, batch: int) -> dict[str, Callable[[], None]]:
    attr = next(iter(cfg.edits.attributes.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomClipWarning)
        clip = load_clip(ClipConfig(model=clip_model, seed=0))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, denoiser.sample_size, denoiser.sample_size, generator=gen) * 2 - 1
    loss = EditLoss(DirectionalClipLoss(clip, attr.source, attr.target))
    src = loss.source_embedding(x0)
    mk = cfg.edits.markovian
    x_t0 = ddim_invert(denoiser, denoiser.schedule, x0,
                       timesteps=chain_timesteps(mk.t0, mk.inversion_steps)).xts[0]
    T = denoiser.schedule.num_train_timesteps
    cases = {}
    for method in ("score matching", f"markovian ({mk.train_steps} steps)"):
        rect = edit_rectifier_from(recon)
        model = ModulatedDenoiser(denoiser, rect)
        opt, _ = make_optimizer(rect, 1e-3, 0.0, 10, 0.9)
        if method == "score matching":
            obj = ScoreMatchingObjective(model, loss)
            cases[f"{clip_model}: {method}"] = (
                lambda obj=obj, opt=opt: edit_step_score_matching(obj, opt, x0, gen, T, src))
        else:
            obj = MarkovianObjective(model, loss, mk.t0, mk.train_steps)
            cases[f"{clip_model}: {method}"] = (
                lambda obj=obj, opt=opt: edit_step_markovian(obj, opt, x0, x_t0, src))

    def clip_only():
        pred = x0.clone().requires_grad_(True)
        loss.terms(pred, x0, src).total.sum().backward()

    cases[f"{clip_model}: CLIP fwd+bwd alone"] = clip_only
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", type=Path, default=Path("models/backbone"))
    ap.add_argument("--rectifier", type=Path, default=Path("models/rectifier"))
    ap.add_argument("--clip-models", nargs="+", default=None,
                    help="open_clip architectures to time (default: params.yaml's clip.model)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: attribute's)")
    ap.add_argument("--edit-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="inversion steps N (default: params)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--budget-s", type=float, default=120.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config()
    denoiser, recon, where = models(cfg, args.backbone, args.rectifier)
    attr = next(iter(cfg.edits.attributes.values()))
    batch = args.batch or attr.batch_size
    clip_models = args.clip_models or [cfg.clip.model]
    inv = InversionConfig(num_steps=args.steps or cfg.inversion.num_steps, eta=cfg.inversion.eta,
                          skip=cfg.inversion.skip, seed=0)
    print(f"models: {where}; threads={torch.get_num_threads()} load_avg={os.getloadavg()[0]:.1f}; "
          f"rectifier trunk {recon.cfg.trunk.value}, {recon.num_targets} targets; "
          f"training batch {batch}; editing batch {args.edit_batch}, N={inv.num_steps}, "
          f"skip={inv.skip}\n")

    cases = {}
    for m in clip_models:
        cases.update(training_cases(cfg, denoiser, recon, m, batch))
    ms = time_cases(cases, args.repeats, args.budget_s)
    rows = []
    for m in clip_models:
        sm = ms[f"{m}: score matching"]
        for name, s in ms.items():
            if name.startswith(f"{m}: "):
                rows.append((name, f"{s:.3f}", f"{s / sm:.2f}x"))
    print("Edit training, seconds per optimisation step (ratio to score matching):")
    print_table(rows, ("case", "s/step", "vs score matching"))

    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(args.edit_batch, 3, denoiser.sample_size, denoiser.sample_size,
                    generator=gen) * 2 - 1
    editor = Editor(denoiser, inv, {"attr": recon})
    seeds = list(range(args.edit_batch))
    inverted = editor.invert(x0, seeds)
    ms = time_cases({
        "invert + edit": lambda: editor.edit(x0, seeds, names=("attr",)),
        "edit (inverted)": lambda: editor.edit(x0, seeds, names=("attr",), inversion=inverted),
    }, max(2, args.repeats // 2), args.budget_s)
    print(f"\nEditing, batch {args.edit_batch}, N={inv.num_steps}:")
    print_table([(k, f"{v:.2f}", f"{args.edit_batch / v:.2f}") for k, v in ms.items()],
                ("case", "s/batch", "images/s"))


if __name__ == "__main__":
    main()
