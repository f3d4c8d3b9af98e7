"""What runtime.precision changes: reconstruction error, edit difference and training gradients
under fp32, bf16 and fp16 autocast, against fp32, on the CPU (or any device).

    .venv/bin/python benchmarks/precision.py                  # ~5 min on an idle 2-core CPU
    .venv/bin/python benchmarks/precision.py --device cuda    # the same on a GPU

Model: the tiny backbone trained for ``--train-steps`` on the bundled faces (a model whose noise
estimates mean something) and a rectifier with nonzero offsets (a stand-in for a trained edit
rectifier: its heads drawn at the scale trained ones reach). Per precision:
  * edit-friendly reconstruction max error through the rectified model (N = 20): the maps are
    float32 whatever the precision, so the replay must give the input back;
  * the edit (maps replayed through the rectified model) against the fp32 edit: mean and max
    |difference| on [-1, 1], and the share of 8-bit pixel values that change;
  * DDIM reconstruction L1 to the source by the backbone (the model's own fidelity);
  * a training step of the rectifier (reconstruction loss): cosine of the gradient to fp32's,
    relative loss difference, non-finite gradient entries;
  * wall time of the edit relative to fp32 (on a CPU, reduced precision is rarely faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rectifier import print_table  # noqa: E402
from hfedit.config import HfeditConfig, RectifierConfig, RectifierTrunk  # noqa: E402
from hfedit.device import Precision, resolve_device  # noqa: E402


def faces(n: int, resolution: int) -> torch.Tensor:
    from hfedit.data.sources import bundled_images
    from hfedit.data.images import to_tensor

    out = []
    for _, img in bundled_images():
        out.append(to_tensor(img, resolution))
        if len(out) == n:
            break
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="N of inversion and edit")
    args = ap.parse_args()
    device = resolve_device(args.device)

    from hfedit.training.backbone import train_backbone
    from hfedit.evaluation.reconstruction import reconstruct
    from hfedit.diffusion.inversion import invert, per_image_noise, replay
    from hfedit.models.rectifier import ModulatedDenoiser, Rectifier
    from hfedit.training.reconstruction import ReconstructionObjective

    cfg = HfeditConfig().backbone
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.checkpoint_every = args.train_steps, 20, 10**9
    import tempfile

    data = faces(64, 32)
    with tempfile.TemporaryDirectory() as tmp:
        denoiser = train_backbone(cfg, data, tmp, show_progress=False, device=device).denoiser
    torch.manual_seed(0)
    rect = Rectifier(RectifierConfig(trunk=RectifierTrunk.resnet34), denoiser.unet).to(device)
    with torch.no_grad():
        for head in rect.head_a:
            head.weight.normal_(0.0, 0.02)
    x0 = data[-args.images:].to(device)  # faces the short training saw least of
    noise = per_image_noise(list(range(x0.shape[0])), args.steps, x0.shape[1:])
    t = torch.linspace(10, 990, x0.shape[0]).long().to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(device)

    results = {}
    for p in Precision:
        denoiser.precision = p
        model = ModulatedDenoiser(denoiser, rect).conditioned(x0)
        with torch.no_grad():
            start = time.perf_counter()
            inv = invert(denoiser, denoiser.schedule, x0, args.steps, noise=noise)
            edit = replay(model, denoiser.schedule, inv).clamp(-1, 1)
            seconds = time.perf_counter() - start
            inv_r = invert(model, denoiser.schedule, x0, args.steps, noise=noise)
            ef_error = (replay(model, denoiser.schedule, inv_r) - x0).abs().max().item()
            ddim_l1 = reconstruct(denoiser, x0, args.steps)["ddim"]["l1"]  # the backbone's
        rect.zero_grad()
        loss, _ = ReconstructionObjective(ModulatedDenoiser(denoiser, rect))(x0, t, eps)
        loss.backward()
        grad = torch.cat([q.grad.flatten() for q in rect.parameters() if q.grad is not None])
        results[p] = dict(edit=edit, seconds=seconds, ef_error=ef_error, ddim_l1=ddim_l1,
                          loss=loss.item(), grad=grad.clone())
    denoiser.precision = Precision.fp32

    ref = results[Precision.fp32]
    rows = []
    for p, r in results.items():
        diff = (r["edit"] - ref["edit"]).abs()
        u8 = lambda x: ((x + 1) * 127.5).round()  # noqa: E731
        changed = (u8(r["edit"]) != u8(ref["edit"])).float().mean().item()
        finite = torch.isfinite(r["grad"])
        cos = torch.nn.functional.cosine_similarity(torch.where(finite, r["grad"], 0), ref["grad"],
                                                    dim=0).item()
        rows.append((p.value, f"{r['ef_error']:.1e}", f"{diff.mean().item():.2e}",
                     f"{diff.max().item():.2e}", f"{100 * changed:.2f}%", f"{r['ddim_l1']:.5f}",
                     f"{cos:.5f}", f"{abs(r['loss'] - ref['loss']) / ref['loss']:.1e}",
                     str(int((~finite).sum())), f"{r['seconds'] / ref['seconds']:.2f}x"))
    print(f"\nprecision: {device}, tiny backbone ({args.train_steps} training steps), "
          f"{x0.shape[0]} faces at 32 px, N = {args.steps}, {torch.get_num_threads()} threads\n")
    print_table(rows, ("precision", "EF max error", "edit mean |d|", "edit max |d|",
                       "8-bit values changed", "DDIM L1", "grad cosine", "loss rel. d",
                       "non-finite grads", "edit time"))


if __name__ == "__main__":
    main()
