"""DVC stage ``prepare``: image folder (or the bundled faces) -> uint8 Parquet shards + manifest.

    python stages/prepare.py --out data/prepared [--set data.source=data/raw --set data.resolution=64]

Writes ``<out>/shards/*.parquet`` (at most ``data.shard_images`` images each), ``dataset.json``,
``index.json``, ``manifest.json`` (every input, prepared or refused with its reason) and
``preview.png`` (:mod:`hfedit.data.prepared`). Streams: memory does not grow with the number of
images; decoding runs in ``data.workers`` processes; an interrupted run resumes, keeping the
shards it completed. Settings: ``data`` in params.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Only the standard library at the top: prepare's decode processes import this file again (it
# is their __main__) and must stay light (no torch, no MLflow); the rest is imported in main().


def main(argv: list[str] | None = None):
    """Parse arguments, load the config, prepare the dataset; returns the manifest."""
    from hfedit.config import load_config
    from hfedit.data.prepared import prepare_dataset
    from hfedit.validation import check_output_folder
    from pipelines.tracking import stage_run

    parser = argparse.ArgumentParser(description="Prepare the image dataset (DVC stage).")
    parser.add_argument("--out", type=Path, required=True, help="output folder (dvc.yaml outs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. data.resolution=64")
    args = parser.parse_args(argv)
    check_output_folder(args.out)
    cfg = load_config(overrides=args.overrides)
    with stage_run(cfg, "prepare") as tracker:
        manifest = prepare_dataset(cfg.data, args.out)
        counts = manifest.counts
        tracker.log_metrics({f"prepare/{k}": v for k, v in counts.items() if k != "reasons"}, 0)
        tracker.log_artifact(args.out / "manifest.json")
        tracker.log_artifact(args.out / "preview.png", "plots")
    why = ", ".join(f"{reason}: {n}" for reason, n in counts["reasons"].items())
    rect = counts["rectifier"] or "the backbone's"
    print(f"prepare: {counts['ok']} prepared ({counts['train']} backbone, {rect} rectifier, "
          f"{counts['val']} held out), {counts['error']} refused{f' ({why})' if why else ''} -> {args.out}/manifest.json")
    return manifest


if __name__ == "__main__":
    from hfedit.config import ConfigError
    from hfedit.data.manifest import DatasetError
    from hfedit.validation import UsageError

    try:
        main()
    except (ConfigError, UsageError) as err:  # bad arguments or settings: nothing done
        print(f"prepare: {err}", file=sys.stderr)
        sys.exit(2)
    except DatasetError as err:
        sys.exit(f"prepare: {err}")
