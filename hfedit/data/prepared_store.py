"""``prepare`` to an object store: the dataset is built in this machine's cache by the local
prepare (:func:`hfedit.data.prepared.prepare_dataset`, resumable as any) and uploaded whole,
``dataset.json`` last, no shard re-sent whose record the store already holds."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from hfedit.config import DataConfig
from hfedit.data.manifest import DatasetError, Manifest
from hfedit.data.prepared import prepare_dataset
from hfedit.storage import Location, cache_root


def staging_folder(uri: str) -> Path:
    """Where a prepare to the store ``uri`` builds its dataset on this machine (kept: a rerun
    resumes from it)."""
    return cache_root() / "prepare" / hashlib.sha256(uri.encode()).hexdigest()[:24]


def prepare_to_store(cfg: DataConfig, uri: str, progress: bool) -> Manifest:
    """Prepare into :func:`staging_folder` (local shards, resumable as any prepare), then upload
    it to ``uri``: each file one PUT; a shard whose record on the store is the local one is not
    sent again; ``dataset.json``, which readers open first, is removed before the upload and
    written last, so a reader sees the old dataset, none, or the new one whole; shards of an
    earlier, longer input list are deleted. A source without a usable image uploads its
    manifest (listing every refusal) before the error."""
    staging = staging_folder(uri)
    try:
        manifest = prepare_dataset(cfg, staging, progress)  # a local prepare, resumable
    except DatasetError:
        if (staging / "manifest.json").is_file():
            Location(uri).write_bytes("manifest.json", (staging / "manifest.json").read_bytes())
        raise
    local, store = Location(staging).files(), Location(uri)
    remote = store.files()
    local.pop("dataset.json")
    kept = set()
    for rel in local:  # a shard is kept when its record (its inputs and settings) is the same
        if rel.startswith("shards/") and rel.endswith(".parquet"):
            record = rel[: -len(".parquet")] + ".json"
            if remote.get(rel) == local[rel] and remote.get(record) == local.get(record) and \
                    store.read_bytes(record) == (staging / record).read_bytes():
                kept.update((rel, record))
    if remote.get("dataset.json") is not None:
        store.delete("dataset.json")
    order = sorted(local, key=lambda rel: (not rel.endswith(".parquet"), rel))  # records after
    sent = [store.write_bytes(rel, (staging / rel).read_bytes()) for rel in order if rel not in kept]
    for rel in remote:
        if rel.startswith("shards/") and rel not in local:
            store.delete(rel)
    store.write_bytes("dataset.json", (staging / "dataset.json").read_bytes())
    logging.getLogger(__name__).info("prepare: %d files uploaded to %s (%d shards already there)",
                                     len(sent) + 1, uri, len(kept) // 2)
    return manifest
