"""``python -m hfedit invert|reconstruct|shift IMAGE ...``: one image file in, PNGs out.

    python -m hfedit reconstruct face.jpg --out out/ [--backbone models/backbone] [--steps 50]
    python -m hfedit invert face.jpg --out out/          # x_T and noise-map previews + maps
    python -m hfedit shift face.jpg --dx 8 --dy 0 --out out/

The image is prepared exactly like the ``prepare`` stage (EXIF, mode conversion, centre crop,
resize to the backbone's resolution). Settings default to params.yaml's ``inversion`` section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hfedit.backbone import BackboneUnavailable, Denoiser, load_backbone
from hfedit.config import ConfigError, load_config
from hfedit.data import ImageError, load_image, make_grid_png, save_png, to_tensor
from hfedit.inversion import InversionResult, colour_offset, invert, replay, shift_maps


def _prepare(path: Path, denoiser: Denoiser, max_pixels: int) -> torch.Tensor:
    loaded = load_image(path, max_pixels)
    return to_tensor(loaded.image, denoiser.sample_size)[None]  # (1, 3, R, R)


def _maps_preview(inv: InversionResult) -> torch.Tensor:
    """x_T and up to 7 noise maps, each rescaled to [-1, 1] for viewing."""
    idx = torch.linspace(0, inv.num_steps - 1, min(7, inv.num_steps)).long()
    tiles = [inv.xts[0, 0]] + [inv.zs[i, 0] for i in idx]
    return torch.stack([t / t.abs().max().clamp_min(1e-8) for t in tiles])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hfedit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("invert", "write x_T and the noise maps"),
                       ("reconstruct", "invert then replay: the input back"),
                       ("shift", "invert, shift the maps, replay"),
                       ("colour", "invert, add a colour offset to late maps, replay")):
        p = sub.add_parser(name, help=text)
        p.add_argument("image", type=Path)
        p.add_argument("--out", type=Path, default=Path("outputs/cli"))
        p.add_argument("--backbone", default="models/backbone",
                       help="folder written by the backbone stage, or a diffusers hub id")
        p.add_argument("--steps", type=int, default=None, help="inversion steps N")
        p.add_argument("--eta", type=float, default=None)
        p.add_argument("--skip", type=int, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "shift":
            p.add_argument("--dx", type=int, default=8)
            p.add_argument("--dy", type=int, default=0)
        if name == "colour":
            p.add_argument("--rgb", type=float, nargs=3, default=(0.3, 0.0, -0.3))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(overrides=args.overrides)
        inv_cfg = cfg.inversion
        steps = args.steps or inv_cfg.num_steps
        eta = args.eta if args.eta is not None else inv_cfg.eta
        skip = args.skip if args.skip is not None else inv_cfg.skip
        seed = args.seed if args.seed is not None else inv_cfg.seed
        denoiser = load_backbone(args.backbone)
        x0 = _prepare(args.image, denoiser, cfg.data.max_pixels)
    except (ConfigError, BackboneUnavailable, ImageError) as err:
        print(f"hfedit {args.command}: {err}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(seed)
    inv = invert(denoiser, denoiser.schedule, x0, steps, eta=eta, generator=gen)
    stem = args.image.stem
    out = args.out
    save_png(x0[0], out / f"{stem}_input.png")
    if args.command == "invert":
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({"xts": inv.xts.contiguous(), "zs": inv.zs.contiguous(),
                   "timesteps": torch.tensor(inv.timesteps)}, str(out / f"{stem}_maps.safetensors"),
                  metadata={"eta": str(eta)})
        make_grid_png(_maps_preview(inv), out / f"{stem}_maps.png", nrow=8)
        print(f"wrote {out / f'{stem}_maps.safetensors'} and {out / f'{stem}_maps.png'}")
        return 0
    if args.command == "shift":
        inv, suffix = shift_maps(inv, args.dx, args.dy), f"shift_{args.dx}_{args.dy}"
    elif args.command == "colour":
        inv, suffix = colour_offset(inv, args.rgb, start=0.5, end=1.0), "colour"
    else:
        suffix = "reconstruction"
    result = replay(denoiser, denoiser.schedule, inv, skip=skip)
    path = save_png(result[0].clamp(-1, 1), out / f"{stem}_{suffix}.png")
    err = (result - x0).abs().max().item()
    print(f"wrote {path} (N={steps}, eta={eta}, skip={skip}; max |result - input| = {err:.2e})")
    return 0
