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

import argparse
import sys
from pathlib import Path

import torch

from hfedit.models.backbone import BackboneUnavailable, describe, load_backbone, save_backbone
from hfedit.training.backbone import sample_grid, train_backbone
from hfedit.config import ConfigError, HfeditConfig, load_config
from hfedit.data.grids import make_grid_png
from hfedit.data.prepared import data_location, load_split
from hfedit.device import DeviceUnavailable, placement
from hfedit.files import atomic_write_csv
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
    parser = argparse.ArgumentParser(description="Resolve or train the backbone (DVC stage).")
    parser.add_argument("--data", type=data_location, default=data_location("data/prepared"),
                        help="prepared folder: a path, or a URI every node sees (s3://, file://)")
    parser.add_argument("--out", type=Path, default=Path("models/backbone"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/backbone"))
    parser.add_argument("--plots", type=Path, default=Path("plots/backbone"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(overrides=args.overrides)
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    meta = run(cfg, args.data, args.out, args.checkpoints, args.plots)
    print(f"backbone: {meta['parameters']:,} parameters, {meta['sample_size']}px -> {args.out}")
    return meta


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, BackboneUnavailable, DeviceUnavailable, ValueError) as err:
        sys.exit(f"backbone: {err}")
