"""DVC stage ``prepare``: image folder (or the bundled faces) -> uint8 Parquet shards + manifest.

    python stages/prepare.py --out data/prepared [--set data.source=data/raw --set data.resolution=64]

``--out`` and ``data.source`` may be object-store URIs (``s3://bucket/prefix``): the dataset is
built in this machine's cache and uploaded (docs/cluster.md). Writes ``<out>/shards/*.parquet`` (at most ``data.shard_images`` images each), ``dataset.json``,
``index.json``, ``manifest.json`` (every input, prepared or refused with its reason) and
``preview.png`` (:mod:`hfedit.data.prepared`). Streams: memory does not grow with the number of
images; decoding runs in ``data.workers`` processes; an interrupted run resumes, keeping the
shards it completed. Settings: ``data`` in params.yaml.
"""

from __future__ import annotations

# Only the standard library at the top: prepare's decode processes import this file again (it
# is their __main__) and must stay light (no torch, no MLflow); the rest is imported in main().


def main(argv: list[str] | None = None):
    """Parse arguments, load the config, prepare the dataset; returns the manifest."""
    from hfedit.data.prepared import prepare_dataset
    from hfedit.data.prepared_store import staging_folder
    from hfedit.storage import is_uri, join
    from hfedit.validation import check_output_folder, check_store
    from pipelines.entry import parse_and_load, stage_parser
    from pipelines.tracking import stage_run

    parser = stage_parser("Prepare the image dataset (DVC stage).")
    parser.add_argument("--out", required=True,
                        help="output folder (dvc.yaml outs), or a store URI (s3://bucket/prefix)")
    args, cfg = parse_and_load(parser, argv)
    if is_uri(cfg.data.source):
        check_store(cfg.data.source, "data.source")
    if is_uri(args.out):
        check_store(args.out, "--out", output=True)
        built = staging_folder(args.out)  # the local copy the upload came from
    else:
        built = check_output_folder(args.out)
    with stage_run(cfg, "prepare") as tracker:
        manifest = prepare_dataset(cfg.data, args.out)
        counts = manifest.counts
        tracker.log_metrics({f"prepare/{k}": v for k, v in counts.items() if k != "reasons"}, 0)
        tracker.log_artifact(built / "manifest.json")
        tracker.log_artifact(built / "preview.png", "plots")
    why = ", ".join(f"{reason}: {n}" for reason, n in counts["reasons"].items())
    rect = counts["rectifier"] or "the backbone's"
    print(f"prepare: {counts['ok']} prepared ({counts['train']} backbone, {rect} rectifier, "
          f"{counts['val']} held out), {counts['error']} refused{f' ({why})' if why else ''} -> {join(args.out, 'manifest.json')}")
    return manifest


if __name__ == "__main__":
    from hfedit.data.manifest import DatasetError
    from pipelines.entry import run_main

    run_main("prepare", main, failures=(DatasetError,), uri_flags=("--out", "data.source"))
