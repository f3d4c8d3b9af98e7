"""DVC stage ``backbone``: resolve or train the diffusion backbone, save it diffusers-style.

    python stages/backbone.py --data data/prepared --out models/backbone \
        --checkpoints checkpoints/backbone --plots plots/backbone [--set key=value ...]

``backbone.source=train`` (the ``tiny`` profile) trains a small DDPM on the prepared training
split, resuming from ``--checkpoints`` when rerun; any other source (a hub id or a folder) is
loaded and re-saved so later stages read one layout. Writes ``<out>`` (``model_index.json``,
``unet/``, ``scheduler/``, ``hfedit.json``), ``<plots>/loss.csv`` and ``<plots>/samples.png``,
all logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

from hfedit.models.backbone import BackboneUnavailable, describe, load_backbone, save_backbone
from hfedit.training.backbone import sample_grid, train_backbone
from hfedit.config import HfeditConfig
from hfedit.data.grids import make_grid_png
from hfedit.data.prepared import load_split
from hfedit.device import placement
from hfedit.files import atomic_write_csv
from pipelines.entry import parse_and_load, run_main, stage_parser
from pipelines.serving import log_backbone_model
from pipelines.tracking import stage_run


def run(cfg: HfeditConfig, data: Path, out: Path, checkpoints: Path, plots: Path) -> dict:
    plots.mkdir(parents=True, exist_ok=True)
    device, precision = placement(cfg.runtime.device, cfg.runtime.precision, "evaluation")
    with stage_run(cfg, "backbone") as tracker:
        if cfg.backbone.source == "train":
            images = load_split(data, "train")
            result = train_backbone(cfg.backbone, images, checkpoints, log=tracker.log_metrics,
                                    device=device)
            denoiser = result.denoiser
            atomic_write_csv(plots / "loss.csv", ["step", "loss"], result.losses)
            meta = {"source": "train", "train_images": int(images.shape[0]),
                    "data_digest": images.data.digest,
                    "resumed_from_step": result.resumed_from}
        else:
            denoiser = load_backbone(cfg.backbone.source, device)
            atomic_write_csv(plots / "loss.csv", ["step", "loss"], [])
            meta = {"source": cfg.backbone.source}
        meta.update(describe(denoiser))
        save_backbone(denoiser, out, meta=meta)
        denoiser.precision = precision  # the preview samples, at the run's precision
        tc = cfg.backbone.train
        samples = sample_grid(denoiser, tc.num_samples, tc.sample_steps, seed=tc.seed)
        make_grid_png(samples, plots / "samples.png", nrow=int(tc.num_samples ** 0.5))
        tracker.log_params({f"backbone_meta.{k}": v for k, v in meta.items()})
        tracker.log_artifact(plots / "samples.png", "plots")
        tracker.log_artifact(plots / "loss.csv", "plots")
        # registered as <prefix>-backbone (a reconstructing pyfunc model holding the folder);
        # the rectifier models trained on it link to it instead of carrying a copy
        log_backbone_model(cfg, tracker.run_id, out)
    return meta


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("Resolve or train the backbone (DVC stage).", data=True)
    parser.add_argument("--out", type=Path, default=Path("models/backbone"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/backbone"))
    parser.add_argument("--plots", type=Path, default=Path("plots/backbone"))
    args, cfg = parse_and_load(parser, argv)
    meta = run(cfg, args.data, args.out, args.checkpoints, args.plots)
    print(f"backbone: {meta['parameters']:,} parameters, {meta['sample_size']}px -> {args.out}")
    return meta


if __name__ == "__main__":
    run_main("backbone", main, failures=(BackboneUnavailable, ValueError))
