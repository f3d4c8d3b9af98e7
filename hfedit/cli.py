"""hfedit (or python -m hfedit): edit a real image with a diffusion model (edit-friendly DDPM
inversion + rectifiers), one image file in, PNGs out.

Subcommands:
  reconstruct  invert, then replay the maps through the backbone: the input back, exactly
  invert       write x_T and the noise maps (.safetensors) and a preview of them
  shift        invert, shift the noise maps by --dx/--dy pixels, replay: the picture moves
  colour       invert, add an RGB offset to the late noise maps, replay
  edit         invert, replay through an attribute's edit rectifier (models/edits/<attribute>)
  translate    SDEdit: noise to --strength * T, sample down through the reconstruction rectifier

The image is prepared exactly like the ``prepare`` stage (EXIF, mode conversion, centre crop,
resize to the backbone's resolution): the output is at the backbone's resolution (32x32 for the
offline default), and the command says so when the input was another size. Settings default to
params.yaml's ``inversion`` section; ``--backbone``, ``--edits`` and ``--rectifier`` default to the
pipeline's ``models/`` folders of the project: ``$HFEDIT_ROOT``, else the nearest folder above the
current one holding params.yaml, else the checkout hfedit is installed from. ``--device``:
auto (a GPU when one is visible), cpu, cuda or cuda:<i>. The image and the model folders are
checked before any model loads; nothing is written unless the whole command succeeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUBCOMMANDS = (
    ("reconstruct", "invert then replay: the input back"),
    ("invert", "write x_T and the noise maps"),
    ("shift", "invert, shift the maps, replay"),
    ("colour", "invert, add a colour offset to late maps, replay"),
    ("edit", "invert, replay through an attribute's edit rectifier"),
    ("translate", "SDEdit: noise to t0, sample down through the rectifier"),
)


def build_parser(prog: str = "hfedit") -> argparse.ArgumentParser:
    """The argument parser (imports nothing heavy: ``--help`` stays fast)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in SUBCOMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("image", type=Path)
        p.add_argument("--out", type=Path, default=Path("outputs/cli"))
        p.add_argument("--backbone", default=None,
                       help="folder written by the backbone stage, or a diffusers hub id "
                            "(default: <project>/models/backbone)")
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
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "shift":
            p.add_argument("--dx", type=int, default=8)
            p.add_argument("--dy", type=int, default=0)
        if name == "colour":
            p.add_argument("--rgb", type=float, nargs=3, default=(0.3, 0.0, -0.3))
        if name == "edit":
            p.add_argument("--attribute", required=True, help="a folder name under --edits")
            p.add_argument("--edits", type=Path, default=None,
                           help="folder written by the train_edits stage "
                                "(default: <project>/models/edits)")
        if name == "translate":
            p.add_argument("--strength", type=float, default=0.5,
                           help="t0 / T: how much noise is added (0, 1]")
            p.add_argument("--rectifier", default=None,
                           help="reconstruction rectifier folder, or 'none' for the backbone "
                                "alone (default: <project>/models/rectifier)")
    return parser


def run() -> None:
    """The ``hfedit`` console script."""
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hfedit.validation import UsageError, refuse_uris

    try:
        refuse_uris(sys.argv[1:] if argv is None else argv, f"hfedit {args.command}")
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    from hfedit.models.backbone import BackboneUnavailable
    from hfedit.config import ConfigError
    from hfedit.data.images import ImageError
    from hfedit.device import DeviceUnavailable
    from hfedit.validation import UsageError

    try:
        job = _Job(args)
    except (ConfigError, UsageError, BackboneUnavailable, ImageError, DeviceUnavailable,
            KeyError, FileNotFoundError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hfedit {args.command}: {message}", file=sys.stderr)
        return 2
    return job.run()


class _Job:
    """One command: every input checked and every model loaded in ``__init__`` (errors exit 2
    before anything is written), the work and the writing in :meth:`run`."""

    def __init__(self, args) -> None:
        from hfedit.models.backbone import load_backbone
        from hfedit.config import load_config, project_root
        from hfedit.data.images import UNVERIFIED, load_image, to_tensor
        from hfedit.device import placement
        from hfedit.validation import check_output_folder

        self.args = args
        check_output_folder(args.out)
        _check_output_names(args)
        flags = {"num_steps": args.steps, "eta": args.eta, "skip": args.skip, "seed": args.seed,
                 "mode": getattr(args, "mode", None)}
        runtime = [f"runtime.{k}={v}" for k, v in (("device", args.device),
                                                   ("precision", args.precision)) if v]
        cfg = load_config(overrides=[*args.overrides, *runtime, *(f"inversion.{k}={v}" for k, v in
                                                                  flags.items() if v is not None)])
        from hfedit.device import set_threads

        set_threads(cfg.runtime.torch_threads)
        self.inv_cfg = cfg.inversion  # checked by load_config: N >= 1, 0 <= skip < N, eta >= 0
        device, precision = placement(cfg.runtime.device, cfg.runtime.precision, "editing")
        loaded = load_image(args.image, cfg.data.max_pixels,  # the input, before any model
                            require_verified=cfg.data.require_verified)
        if loaded.integrity == UNVERIFIED:
            print(f"note: {args.image}: its format carries nothing that shows damage (integrity "
                  "unverified; --set data.require_verified=true refuses such files)",
                  file=sys.stderr)
        self.input_size = loaded.size
        models = project_root() / "models"
        self.rect_dir = self.edits_dir = None
        if args.command == "edit":
            from hfedit.editing.editor import available_edits

            self.edits_dir = Path(args.edits) if args.edits else models / "edits"
            have = available_edits(self.edits_dir)
            if args.attribute not in have:
                raise KeyError(f"no edit rectifier for attribute '{args.attribute}' in "
                               f"{self.edits_dir} (have: {have}); run the train_edits stage, or "
                               "give --edits the folder it wrote")
        if args.command == "translate":
            if args.rectifier is None:
                self.rect_dir = models / "rectifier"
            elif str(args.rectifier).lower() != "none":
                self.rect_dir = Path(args.rectifier)
            if self.rect_dir is not None and not (self.rect_dir / "rectifier.json").is_file():
                raise FileNotFoundError(f"--rectifier {self.rect_dir}: no rectifier.json there; "
                                        "run the pretrain_rectifier stage, give its folder, or "
                                        "--rectifier none for the backbone alone")
        if args.command == "translate" and not 0 < args.strength <= 1:
            raise ValueError(f"--strength {args.strength:g} must be in (0, 1]")
        self.denoiser = load_backbone(args.backbone or models / "backbone", device, precision)
        self.x0 = to_tensor(loaded.image, self.denoiser.sample_size)[None].to(device)  # (1, 3, R, R)
        self.rectifiers, self.recon, self.clip_info = {}, None, {}
        if args.command == "edit":
            import json

            from hfedit.editing.editor import load_edit_rectifiers

            self.rectifiers = load_edit_rectifiers(self.edits_dir, self.denoiser.unet,
                                                   [args.attribute], device=device)
            meta = json.loads((self.edits_dir / args.attribute / "rectifier.json").read_text())
            self.clip_info = meta.get("clip", {})
        if self.rect_dir is not None:
            from hfedit.models.checkpoint import load_rectifier

            self.recon, _ = load_rectifier(self.rect_dir, self.denoiser.unet, device=str(device))

    def run(self) -> int:
        import torch

        from hfedit.diffusion.inversion import colour_offset, invert, replay, shift_maps

        args, inv_cfg, d, x0 = self.args, self.inv_cfg, self.denoiser, self.x0
        steps, eta, skip, seed = inv_cfg.num_steps, inv_cfg.eta, inv_cfg.skip, inv_cfg.seed
        stem, out = args.image.stem, args.out
        writes: list = []  # (kind, path, payload): written only once everything is computed
        with _progress(d.unet, args, _evaluations(args, steps, skip)):
            if args.command == "edit":
                from hfedit.editing.editor import Editor

                batch = Editor(d, inv_cfg, self.rectifiers).edit(x0, [seed], names=(args.attribute,))
                edited = batch.outputs[args.attribute].clamp(-1, 1)
                path = out / f"{stem}_{args.attribute}.png"
                writes += [("png", path, edited[0]),
                           ("grid", out / f"{stem}_{args.attribute}_pair.png", torch.cat([x0, edited]))]
                change = (edited - x0).abs().mean().item() / 2
                done = (f"attribute {args.attribute}, {inv_cfg.mode.value}, N={steps}, "
                        f"eta={0.0 if inv_cfg.mode.value == 'ddim' else eta}, skip={skip}; mean "
                        f"|edit - input| = {change:.4f} on [0, 1]")
            elif args.command == "translate":
                from hfedit.editing.editor import Editor

                result = Editor(d, inv_cfg, reconstruction_rectifier=self.recon).translate(
                    x0, [seed], args.strength)
                path = out / f"{stem}_translate_{args.strength:g}.png"
                writes.append(("png", path, result[0].clamp(-1, 1)))
                how = f"rectifier {self.rect_dir}" if self.recon is not None else "backbone alone"
                done = f"SDEdit, strength {args.strength:g}, N={steps}, {how}"
            else:
                inv = invert(d, d.schedule, x0, steps, eta=eta,
                             generator=torch.Generator().manual_seed(seed))
                if args.command == "invert":
                    maps = {"xts": inv.xts.cpu().contiguous(), "zs": inv.zs.cpu().contiguous(),
                            "timesteps": torch.tensor(inv.timesteps)}
                    path = out / f"{stem}_maps.safetensors"
                    writes += [("maps", path, (maps, eta)),
                               ("grid", out / f"{stem}_maps.png", _maps_preview(inv))]
                    done = f"and {out / f'{stem}_maps.png'}"
                else:
                    if args.command == "shift":
                        inv, suffix = shift_maps(inv, args.dx, args.dy), f"shift_{args.dx}_{args.dy}"
                    elif args.command == "colour":
                        inv, suffix = colour_offset(inv, args.rgb, start=0.5, end=1.0), "colour"
                    else:
                        suffix = "reconstruction"
                    result = replay(d, d.schedule, inv, skip=skip)
                    path = out / f"{stem}_{suffix}.png"
                    writes.append(("png", path, result[0].clamp(-1, 1)))
                    err = (result - x0).abs().max().item()
                    done = f"N={steps}, eta={eta}, skip={skip}; max |result - input| = {err:.2e}"
        writes.insert(0, ("png", out / f"{stem}_input.png", x0[0]))
        _write(writes)
        print(f"wrote {path} ({done})" if args.command != "invert" else f"wrote {path} {done}")
        res = d.sample_size
        if tuple(self.input_size) != (res, res):
            print(f"note: the output is {res}x{res}, the backbone's resolution; the input was "
                  f"{self.input_size[0]}x{self.input_size[1]} (centre-cropped and resized as the "
                  "prepare stage does)", file=sys.stderr)
        if args.command == "edit" and self.clip_info.get("semantic") is False:
            print(f"note: '{args.attribute}' was trained with random CLIP weights: the edit is not "
                  "semantic", file=sys.stderr)
        return 0


def _check_output_names(args) -> None:
    """The longest name this command may write, checked before any model runs: a name over 255
    bytes (a long input name) cannot be created (``UsageError``, exit 2)."""
    import os

    from hfedit.files import NAME_MAX
    from hfedit.validation import UsageError

    stem = args.image.stem
    tails = ["input.png", "maps.safetensors", "reconstruction.png", "colour.png",
             f"{getattr(args, 'attribute', '')}_pair.png",
             f"translate_{getattr(args, 'strength', 1):g}.png",
             f"shift_{getattr(args, 'dx', 0)}_{getattr(args, 'dy', 0)}.png"]
    longest = max((f"{stem}_{t}" for t in tails), key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(longest)) > NAME_MAX:
        raise UsageError(f"--image {args.image.name[:40]}...: outputs such as {longest[:40]}... would "
                         f"have names over {NAME_MAX} bytes; rename the image (a shorter name)")


def _evaluations(args, steps: int, skip: int) -> int | None:
    """U-Net passes the command makes (for the progress bar), None when not known up front."""
    if args.command == "invert":
        return steps
    if args.command == "translate":
        return None
    return steps + (steps - skip)  # inversion + replay (a modulated pass per step for edits)


class _progress:
    """A tqdm bar advanced by every forward pass of ``unet`` (a hook: nothing in the library
    changes); on stderr, only on a terminal unless asked otherwise."""

    def __init__(self, unet, args, total: int | None) -> None:
        self.unet, self.args, self.total = unet, args, total

    def __enter__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=f"hfedit {self.args.command}", unit="pass",
                        disable=True if self.args.no_progress else None, leave=False)
        self.hook = self.unet.register_forward_hook(self._advance)
        return self

    def _advance(self, *_) -> None:
        # A forward hook that returns a value replaces the module's output: return nothing
        # (tqdm's update() returns True whenever it redraws, on a terminal).
        self.bar.update(1)

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        self.bar.close()


def _maps_preview(inv):
    """x_T and up to 7 noise maps, each rescaled to [-1, 1] for viewing."""
    import torch

    idx = torch.linspace(0, inv.num_steps - 1, min(7, inv.num_steps)).long()
    tiles = [inv.xts[0, 0]] + [inv.zs[i, 0] for i in idx]
    return torch.stack([t / t.abs().max().clamp_min(1e-8) for t in tiles])


def _write(writes: list) -> None:
    from safetensors.torch import save_file

    from hfedit.data.grids import make_grid_png
    from hfedit.data.images import save_png
    from hfedit.files import atomic_write

    for kind, path, payload in writes:
        if kind == "png":
            save_png(payload, path)
        elif kind == "grid":
            make_grid_png(payload, path, nrow=8 if path.name.endswith("_maps.png") else 2)
        else:
            maps, eta = payload
            atomic_write(path, lambda tmp: save_file(maps, tmp, metadata={"eta": str(eta)}))
