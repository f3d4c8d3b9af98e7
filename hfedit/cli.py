"""``python -m hfedit invert|reconstruct|shift IMAGE ...``: one image file in, PNGs out.

    python -m hfedit reconstruct face.jpg --out out/ [--backbone models/backbone] [--steps 50]
    python -m hfedit invert face.jpg --out out/          # x_T and noise-map previews + maps
    python -m hfedit shift face.jpg --dx 8 --dy 0 --out out/
    python -m hfedit edit face.jpg --attribute smiling --out out/   # models/edits/smiling
    python -m hfedit translate sketch.png --strength 0.5 --out out/ # SDEdit + models/rectifier

The image is prepared exactly like the ``prepare`` stage (EXIF, mode conversion, centre crop,
resize to the backbone's resolution). Settings default to params.yaml's ``inversion`` section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hfedit.backbone import BackboneUnavailable, Denoiser, load_backbone
from hfedit.config import ConfigError, InversionConfig, load_config
from hfedit.data import ImageError, load_image, make_grid_png, save_png, to_tensor
from hfedit.device import DeviceUnavailable, placement
from hfedit.files import atomic_write
from hfedit.inversion import InversionResult, colour_offset, invert, replay, shift_maps
from hfedit.validation import UsageError, check_output_folder


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
                       ("colour", "invert, add a colour offset to late maps, replay"),
                       ("edit", "invert, replay through an attribute's edit rectifier"),
                       ("translate", "SDEdit: noise to t0, sample down through the rectifier")):
        p = sub.add_parser(name, help=text)
        p.add_argument("image", type=Path)
        p.add_argument("--out", type=Path, default=Path("outputs/cli"))
        p.add_argument("--backbone", default="models/backbone",
                       help="folder written by the backbone stage, or a diffusers hub id")
        p.add_argument("--steps", type=int, default=None, help="inversion steps N")
        p.add_argument("--eta", type=float, default=None)
        p.add_argument("--skip", type=int, default=None)
        p.add_argument("--seed", type=int, default=None)
        if name == "edit":
            p.add_argument("--mode", choices=["edit_friendly", "ddim"], default=None,
                           help="edit-friendly replay or DDIM inversion + sampling "
                                "(default: inversion.mode)")
        p.add_argument("--device", default=None,
                       help="auto | cpu | cuda | cuda:<i> (default: runtime.device, auto)")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                       help="autocast of the network passes (default: runtime.precision, fp32)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "shift":
            p.add_argument("--dx", type=int, default=8)
            p.add_argument("--dy", type=int, default=0)
        if name == "colour":
            p.add_argument("--rgb", type=float, nargs=3, default=(0.3, 0.0, -0.3))
        if name == "edit":
            p.add_argument("--attribute", required=True, help="a folder name under --edits")
            p.add_argument("--edits", type=Path, default=Path("models/edits"),
                           help="folder written by the train_edits stage")
        if name == "translate":
            p.add_argument("--strength", type=float, default=0.5,
                           help="t0 / T: how much noise is added (0, 1]")
            p.add_argument("--rectifier", default="models/rectifier",
                           help="reconstruction rectifier folder, or 'none' for the backbone alone")
    args = parser.parse_args(argv)
    flags = {"num_steps": args.steps, "eta": args.eta, "skip": args.skip, "seed": args.seed,
             "mode": getattr(args, "mode", None)}
    try:
        check_output_folder(args.out)
        runtime = [f"runtime.{k}={v}" for k, v in (("device", args.device),
                                                   ("precision", args.precision)) if v]
        cfg = load_config(overrides=[*args.overrides, *runtime, *(f"inversion.{k}={v}" for k, v in
                                                                  flags.items() if v is not None)])
        device, precision = placement(cfg.runtime.device, cfg.runtime.precision, "editing")
        inv_cfg = cfg.inversion  # checked by load_config: N >= 1, 0 <= skip < N, eta >= 0
        steps, eta, skip, seed = inv_cfg.num_steps, inv_cfg.eta, inv_cfg.skip, inv_cfg.seed
        denoiser = load_backbone(args.backbone, device, precision)
        x0 = _prepare(args.image, denoiser, cfg.data.max_pixels).to(device)
    except (ConfigError, UsageError, BackboneUnavailable, ImageError, DeviceUnavailable,
            ValueError) as err:
        print(f"hfedit {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command in ("edit", "translate"):
        return _edit_or_translate(args, denoiser, x0, inv_cfg)
    gen = torch.Generator().manual_seed(seed)
    inv = invert(denoiser, denoiser.schedule, x0, steps, eta=eta, generator=gen)
    stem = args.image.stem
    out = args.out
    save_png(x0[0], out / f"{stem}_input.png")
    if args.command == "invert":
        from safetensors.torch import save_file

        maps = {"xts": inv.xts.cpu().contiguous(), "zs": inv.zs.cpu().contiguous(),
                "timesteps": torch.tensor(inv.timesteps)}
        atomic_write(out / f"{stem}_maps.safetensors",
                     lambda tmp: save_file(maps, tmp, metadata={"eta": str(eta)}))
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


def _edit_or_translate(args, denoiser: Denoiser, x0: torch.Tensor, inv_cfg: InversionConfig) -> int:
    """``edit``: invert with the backbone, replay through ``--edits/<attribute>`` conditioned on
    the input; ``translate``: SDEdit through the reconstruction rectifier (hfedit.editing)."""
    import json

    from hfedit.checkpoint import load_rectifier
    from hfedit.editing import Editor, load_edit_rectifiers

    stem, out = args.image.stem, args.out
    save_png(x0[0], out / f"{stem}_input.png")
    try:
        if args.command == "edit":
            rects = load_edit_rectifiers(args.edits, denoiser.unet, [args.attribute],
                                         device=denoiser.device)
            meta_file = Path(args.edits) / args.attribute / "rectifier.json"
            clip_info = json.loads(meta_file.read_text()).get("clip", {})
        else:
            recon = None
            if str(args.rectifier).lower() != "none":
                recon, _ = load_rectifier(args.rectifier, denoiser.unet, device=str(denoiser.device))
    except (KeyError, FileNotFoundError, ValueError) as err:
        print(f"hfedit {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "translate":
        try:
            result = Editor(denoiser, inv_cfg, reconstruction_rectifier=recon).translate(
                x0, [inv_cfg.seed], args.strength)
        except ValueError as err:
            print(f"hfedit translate: {err}", file=sys.stderr)
            return 2
        path = save_png(result[0].clamp(-1, 1), out / f"{stem}_translate_{args.strength:g}.png")
        how = "rectifier " + str(args.rectifier) if recon is not None else "backbone alone"
        print(f"wrote {path} (SDEdit, strength {args.strength:g}, N={inv_cfg.num_steps}, {how})")
        return 0
    editor = Editor(denoiser, inv_cfg, rects)
    batch = editor.edit(x0, [inv_cfg.seed], names=(args.attribute,))
    edited = batch.outputs[args.attribute].clamp(-1, 1)
    path = save_png(edited[0], out / f"{stem}_{args.attribute}.png")
    make_grid_png(torch.cat([x0, edited]), out / f"{stem}_{args.attribute}_pair.png", nrow=2)
    change = (edited - x0).abs().mean().item() / 2
    print(f"wrote {path} (attribute {args.attribute}, {inv_cfg.mode.value}, N={inv_cfg.num_steps}, "
          f"eta={0.0 if inv_cfg.mode.value == 'ddim' else inv_cfg.eta}, "
          f"skip={inv_cfg.skip}; mean |edit - input| = {change:.4f} on [0, 1])")
    if clip_info.get("semantic") is False:
        print(f"note: '{args.attribute}' was trained with random CLIP weights: the edit is not "
              "semantic", file=sys.stderr)
    return 0
