"""The prepared dataset: uint8 images in Parquet shards, written by streaming, read per batch.

A prepared folder (``data/prepared``) holds::

    dataset.json          format, resolution, the shards, the split sizes and the split key
    index.json            per split: its ids (sorted) and the shard and row of each
    manifest.json         every input: prepared (split, index, shard, row) or refused (reason)
    preview.png           the first training images
    shards/00000.parquet  columns id (binary: the file name's bytes, so names that are not UTF-8
                          survive), key (binary: sha256(seed:id), the split key) and pixels
                          (binary: R*R*3 uint8, rows x columns x RGB)
    shards/00000.json     the shard's record: its inputs, the decode settings and their manifest
                          rows; written after the shard, so it marks it complete

Why Parquet: pyarrow reads single row groups of it, for random batches (:meth:`PreparedData.read`)
and for Ray Data's tasks (``pipelines.ray_runtime.split_dataset``); any pyarrow filesystem serves
it (a local or NFS path, ``s3://...``); any Parquet reader (``ray.data.read_parquet``, pandas,
DuckDB) opens it, a split chosen by a filter on ``key`` (:meth:`PreparedData.split_filter`).
uint8 is 4x smaller than float32; the reader converts to [-1, 1] per batch
(:func:`hfedit.data.images.pixels_to_tensor`), bit-identical to :func:`hfedit.data.images.to_tensor`.

Shard k holds the good images among inputs ``k*S .. (k+1)*S - 1`` (``S = data.shard_images``,
inputs sorted by id), so shard boundaries and contents depend only on the inputs and settings:
an interrupted prepare resumes and skips every shard whose record matches. The splits (train:
the backbone's images; rectifier: its own, ``data.rectifier_fraction``; val: held out) are drawn
at the end over the good ids by :func:`hfedit.data.manifest.split_roles` and need no rewrite of
the shards: each is a range of ``key`` (val the smallest keys, ``key <= val_key_max``; the
rectifier's the next ones, ``key <= rectifier_key_max``; train the rest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import numpy as np

from hfedit.config import DataConfig
from hfedit.data.manifest import (
    SPLITS,
    DatasetError,
    Manifest,
    ManifestRow,
    id_digest,
    split_roles,
    write_manifest,
)
from hfedit.data.images import _u8_to_tensor, pixels_to_u8
from hfedit.data.sources import Input, decode_inputs, list_inputs
from hfedit.data.grids import write_grid_png
from hfedit.files import atomic_write, atomic_write_text
from hfedit.storage import filesystem, is_uri
from hfedit.progress import progress as progress_bar

if TYPE_CHECKING:  # prepare imports no torch: readers convert to tensors per batch
    import torch

FORMAT = "hfedit-shards/1"
# Images per Parquet row group: the unit a random read decodes (8 x 192 KiB at 256 px).
ROW_GROUP = 8
# Decode work items are this many inputs: small enough that the workers share a shard.
DECODE_ITEMS = 16
PREVIEW_MAX = 64


# ------------------------------------------------------------------------------- inputs
def _decode_settings(cfg: DataConfig) -> dict:
    """What a shard's content depends on besides its inputs (a change redoes the shard)."""
    return {"format": FORMAT, "resolution": cfg.resolution, "center_crop": cfg.center_crop,
            "max_pixels": cfg.max_pixels, "seed": cfg.seed,  # require_verified only when set:
            **({"require_verified": True} if cfg.require_verified else {})}  # digests stay


# -------------------------------------------------------------------------------- shards
def _shard_name(k: int) -> str:
    return f"shards/{k:05d}"


def _record_matches(out: Path, k: int, ids: list[str], settings: dict) -> Optional[list[dict]]:
    """The manifest rows of shard ``k`` when it is complete for these inputs and settings."""
    record, shard = out / f"{_shard_name(k)}.json", out / f"{_shard_name(k)}.parquet"
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("ids") != ids or rec.get("settings") != settings or not shard.is_file():
        return None
    return rec["rows"]


def _write_shard(out: Path, k: int, ids: list[str], settings: dict,
                 results: list[tuple[dict, Optional[bytes]]]) -> list[dict]:
    """Write shard ``k`` (its good images, in input order) and then its record; returns its
    manifest rows with ``shard``/``row`` set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, good_ids, keys, pixels = [], [], [], []
    for row, px in results:
        if px is not None:
            row = {**row, "shard": k, "row": len(pixels),
                   "content": hashlib.sha256(px).hexdigest()[:32]}
            good_ids.append(os.fsencode(row["id"]))
            keys.append(id_digest(settings["seed"], row["id"]))
            pixels.append(px)
        rows.append(row)
    table = pa.table({"id": pa.array(good_ids, pa.binary()),
                      "key": pa.array(keys, pa.binary()),
                      "pixels": pa.array(pixels, pa.binary())})
    # No compression: natural images barely compress with Parquet's codecs and random reads
    # would pay the decompression; row groups of ROW_GROUP images keep random reads small.
    atomic_write(out / f"{_shard_name(k)}.parquet",
                 lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP,
                                            compression="none"))
    atomic_write_text(out / f"{_shard_name(k)}.json",
                      json.dumps({"ids": ids, "settings": settings, "rows": rows}))
    return rows


def prepare_dataset(cfg: DataConfig, out_dir: str | os.PathLike, progress: bool = True) -> Manifest:
    """Decode every input of ``cfg.source`` ("bundled" or a folder) into uint8 Parquet shards of
    at most ``cfg.shard_images`` images under ``out_dir``, split the good ones
    (:func:`hfedit.data.manifest.split_roles`) and write dataset.json, index.json, manifest.json
    and preview.png.

    Streams: at most one shard's pixels and a few decode items are in memory at a time. Decoding
    runs in ``cfg.workers`` processes (0 = one per CPU; a process pool rather than Ray Data:
    every input's outcome comes back to this process, which keeps the manifest exact and the
    shards in input order, and a stage that reads one file system needs no cluster). Shards whose
    record matches (same inputs, same settings) are kept: an interrupted prepare resumes.

    ``out_dir`` may be an object-store URI (``s3://bucket/prepared``): the dataset is built in
    this machine's cache and uploaded (:mod:`hfedit.data.prepared_store`).

    Raises :class:`DatasetError` naming the source when no input is a usable image (the manifest
    listing every refusal is written first).
    """
    if is_uri(out_dir):
        from hfedit.data.prepared_store import prepare_to_store

        return prepare_to_store(cfg, str(out_dir), progress)
    if cfg.resolution <= 0 or cfg.max_pixels <= 0 or cfg.max_images < 0 or cfg.shard_images < 1:
        raise ValueError(f"data.resolution={cfg.resolution}, data.max_pixels={cfg.max_pixels} and "
                         f"data.shard_images={cfg.shard_images} must be positive, "
                         f"data.max_images={cfg.max_images} >= 0 (0 = all)")
    split_roles([], cfg.val_fraction, cfg.rectifier_fraction, cfg.seed)  # checks the fractions
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _decode_settings(cfg)
    inputs = list_inputs(cfg)
    S = cfg.shard_images
    chunks = [inputs[i: i + S] for i in range(0, len(inputs), S)]
    rows_of: dict[int, list[dict]] = {}
    todo = []
    for k, chunk in enumerate(chunks):
        done = _record_matches(out, k, [i.id for i in chunk], settings)
        if done is not None:
            rows_of[k] = done
        else:
            todo.append(k)
    for stale in out.glob("shards/*"):  # shards of an earlier, longer input list
        if stale.suffix in (".json", ".parquet") and stale.stem.isdigit() \
                and int(stale.stem) >= len(chunks):
            stale.unlink()
    bar = progress_bar(total=len(inputs), desc="prepare", unit="img", disable=not progress,
                       initial=sum(len(chunks[k]) for k in rows_of))
    # The bundled faces (102 small images) decode faster than worker processes start.
    items = sum(-(-len(chunks[k]) // DECODE_ITEMS) for k in todo)
    wanted = cfg.workers if cfg.workers > 0 else max(1, os.cpu_count() or 1)
    workers = 1 if cfg.source == "bundled" else max(1, min(wanted, items))
    for k, rows in _decode_shards(out, chunks, todo, settings, workers, bar):
        rows_of[k] = rows
    bar.close()
    return _finish(cfg, out, [ManifestRow(**r) for k in range(len(chunks)) for r in rows_of[k]])


def _decode_shards(out: Path, chunks: list[list[Input]], todo: list[int], settings: dict,
                   workers: int, bar) -> Iterator[tuple[int, list[dict]]]:
    """Decode the shards ``todo`` (in order); yields ``(k, rows)`` as each shard is written."""
    items = [(k, chunks[k][i: i + DECODE_ITEMS]) for k in todo
             for i in range(0, len(chunks[k]), DECODE_ITEMS)]
    pending: dict[int, list] = {}
    for k, n, results in _decoded(items, settings, workers):
        pending.setdefault(k, []).extend(results)
        bar.update(n)
        if len(pending[k]) == len(chunks[k]):
            yield k, _write_shard(out, k, [i.id for i in chunks[k]], settings, pending.pop(k))


def _decoded(items: list[tuple[int, list[Input]]], settings: dict, workers: int
             ) -> Iterator[tuple[int, int, list]]:
    """``(k, len(batch), decode_inputs(batch))`` per item, in submission order (so shards fill,
    and are written, in order): inline for one worker, else in ``workers`` processes with at
    most ``2 * workers`` items in flight (the next item is submitted before waiting on the
    oldest, so the workers never wait on the writer)."""
    if workers <= 1:
        for k, batch in items:
            yield k, len(batch), decode_inputs(batch, settings)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
        it = iter(items)
        queue: deque[tuple[int, int, Future]] = deque(
            (k, len(batch), pool.submit(decode_inputs, batch, settings))
            for k, batch in islice(it, 2 * workers))
        while queue:
            k, n, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt[0], len(nxt[1]), pool.submit(decode_inputs, nxt[1], settings)))
            yield k, n, fut.result()


def _mp_context():
    # forkserver: the stage process has MLflow's and the progress bar's threads running, which fork would
    # copy mid-lock; spawned workers import only what decoding needs.
    import multiprocessing

    return multiprocessing.get_context("forkserver")


def _finish(cfg: DataConfig, out: Path, rows: list[ManifestRow]) -> Manifest:
    """Split the good images, write index.json, dataset.json, preview.png and the manifest."""
    good = [r for r in rows if r.status == "ok"]
    groups = {r.id: r.content for r in good if r.content}  # the same pixels: one split
    train, rect, val = split_roles([r.id for r in good], cfg.val_fraction, cfg.rectifier_fraction,
                                   cfg.seed, groups)
    duplicates = len(groups) - len(set(groups.values()))
    where = ({i: ("train", k) for k, i in enumerate(train)}
             | {i: ("rectifier", k) for k, i in enumerate(rect)}
             | {i: ("val", k) for k, i in enumerate(val)})
    for row in good:
        row.split, row.index = where[row.id]
    reasons = Counter(r.reason for r in rows if r.status == "error")
    counts = {"inputs": len(rows), "ok": len(good), "error": sum(reasons.values()),
              "train": len(train), "rectifier": len(rect), "val": len(val),
              "reasons": dict(sorted(reasons.items())), "duplicates": duplicates}
    manifest = Manifest(cfg.source, dataclasses.asdict(cfg), counts, rows)
    if not good:
        write_manifest(manifest, out)
        summary = ", ".join(f"{k}: {v}" for k, v in counts["reasons"].items()) or "no files"
        raise DatasetError(f"data.source={cfg.source!r}: none of its {len(rows)} files is a usable "
                           f"image ({summary}); see {out / 'manifest.json'}")
    by_id = {r.id: r for r in good}
    # With no rectifier split of its own, the rectifier's split is the backbone's images.
    shared = not rect
    index = {s: {"ids": ids, "shard": [by_id[i].shard for i in ids], "row": [by_id[i].row for i in ids]}
             for s, ids in (("train", train), ("rectifier", train if shared else rect), ("val", val))}
    atomic_write_text(out / "index.json", json.dumps(index))
    shard_rows = Counter(r.shard for r in good)
    n_shards = -(-len(rows) // cfg.shard_images)
    # The splits are ranges of the key (val: the smallest keys, then the rectifier's, then train)
    val_key_max = max((id_digest(cfg.seed, i) for i in val), default=b"")
    rect_key_max = max(max((id_digest(cfg.seed, i) for i in rect), default=val_key_max),
                       val_key_max)  # (only a duplicate group can make it smaller)
    meta = {"format": FORMAT, "resolution": cfg.resolution, "shard_images": cfg.shard_images,
            "row_group": ROW_GROUP,
            "counts": {"train": len(train), "rectifier": len(rect), "val": len(val)},
            "rectifier_shared": shared,
            "shards": [{"file": f"{_shard_name(k)}.parquet", "rows": shard_rows.get(k, 0)}
                       for k in range(n_shards)],
            "val_key_max": val_key_max.hex(), "rectifier_key_max": rect_key_max.hex()}
    if duplicates:  # (without any, dataset.json and so the data's digest are as before)
        meta.update(duplicates=duplicates, key_overrides=_key_overrides(
            cfg.seed, {"train": train, "rectifier": rect, "val": val}, val_key_max, rect_key_max))
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1))
    for old in ("train.safetensors", "val.safetensors"):  # an older format's files
        (out / old).unlink(missing_ok=True)
    data = PreparedData(out)
    write_grid_png(data.read_u8("train", range(min(PREVIEW_MAX, len(train)))), out / "preview.png")
    write_manifest(manifest, out)
    return manifest


def _key_overrides(seed: int, splits: dict[str, list[str]], val_max: bytes, rect_max: bytes
                   ) -> dict[str, str]:
    """{id's bytes as hex: split} for the ids a duplicate group placed outside the key range
    of their split (:meth:`PreparedData.split_filter` selects them by id)."""
    def by_key(i: str) -> str:
        key = id_digest(seed, i)
        return "val" if key <= val_max else "rectifier" if key <= rect_max else "train"

    return {os.fsencode(i).hex(): s for s, ids in splits.items() for i in ids if by_key(i) != s}


# -------------------------------------------------------------------------------- reading
def data_location(text: str | os.PathLike) -> str:
    """A prepared folder as every process (Ray workers included) should name it: a URI
    (``s3://bucket/prepared``, ``file:///nfs/prepared``) unchanged, a path made absolute.
    The ``--data`` argument of every stage."""
    text = str(text)
    return text if "://" in text else str(Path(text).absolute())


class PreparedData:
    """Read access to a prepared folder (a local path or a URI every node sees). Opening reads
    only dataset.json and index.json; images are read per request."""

    def __init__(self, location: str | os.PathLike, cache_bytes: int = 256 << 20):
        self.location = str(location)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self.fs, self.root = filesystem(location)
        meta = self._json("dataset.json", missing=self._missing)
        if meta.get("format") != FORMAT:
            raise DatasetError(f"{self.location}/dataset.json: format {meta.get('format')!r}, this "
                               f"hfedit reads {FORMAT!r}: rerun prepare (dvc repro prepare)")
        self.meta = meta
        self.resolution: int = int(meta["resolution"])
        self.index: dict = self._json("index.json", missing=self._missing)
        # a folder prepared before the rectifier had a split of its own: it shares train's
        self.index.setdefault("rectifier", self.index["train"])
        self.meta.setdefault("rectifier_shared", True)
        self._files: dict[int, object] = {}

    def _missing(self, name: str) -> str:
        old = [s for s in SPLITS if self._exists(f"{s}.safetensors")]
        if old:
            return (f"{self.location} holds prepared data in the old single-file format "
                    f"({', '.join(f'{s}.safetensors' for s in old)}); rerun prepare to shard it: "
                    f"dvc repro prepare (or python stages/prepare.py --out {self.location})")
        return f"{self.location}/{name} not found: run the prepare stage (dvc repro prepare)"

    def _exists(self, name: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(f"{self.root}/{name}").type == fs.FileType.File

    def _json(self, name: str, missing) -> dict:
        if not self._exists(name):
            raise FileNotFoundError(missing(name))
        with self.fs.open_input_stream(f"{self.root}/{name}") as f:
            return json.loads(f.read())

    def uri(self, name: str) -> str:  # as another process opens it: a path or a URI (+ query)
        base, sep, query = self.location.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}" if "://" in base else f"{self.root}/{name}"

    @property
    def digest(self) -> str:
        """Changes whenever prepare writes different data (the fingerprint of dataset.json and
        index.json: shard list, counts, split, ids)."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        h.update(json.dumps(self.index, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _check_split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        return self.index[split]

    def count(self, split: str) -> int:
        return len(self._check_split(split)["ids"])

    def ids(self, split: str) -> list[str]:
        return list(self._check_split(split)["ids"])

    def _file(self, shard: int):
        import pyarrow.parquet as pq

        if shard not in self._files:
            name = self.meta["shards"][shard]["file"]
            self._files[shard] = pq.ParquetFile(self.fs.open_input_file(f"{self.root}/{name}"))
        return self._files[shard]

    def read(self, split: str, indices: Iterable[int]) -> torch.Tensor:
        """Images ``indices`` of ``split`` (positions in :meth:`ids`, any order, repeats allowed)
        -> (n, 3, R, R) float32 in [-1, 1]. Reads only the row groups holding them."""
        return _u8_to_tensor(self.read_u8(split, indices))

    def read_u8(self, split: str, indices: Iterable[int]) -> np.ndarray:
        """:meth:`read` as stored: (n, R, R, 3) uint8."""
        entry = self._check_split(split)
        idx = [int(i) for i in indices]
        n = len(entry["ids"])
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise IndexError(f"{split} split of {self.location} has {n} images; asked for {bad[:5]}")
        G = int(self.meta["row_group"])
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (shard, group) -> (pos, row)
        for pos, i in enumerate(idx):
            shard, row = entry["shard"][i], entry["row"][i]
            groups.setdefault((shard, row // G), []).append((pos, row % G))
        u8 = np.empty((len(idx), self.resolution, self.resolution, 3), np.uint8)
        for where, places in sorted(groups.items()):
            u8[[p for p, _ in places]] = self._group(*where)[[r for _, r in places]]
        return u8

    def _group(self, shard: int, group: int) -> np.ndarray:
        """Row group ``group`` of ``shard`` as (n, R, R, 3) uint8, through a bounded LRU cache
        (``cache_bytes``): repeated random batches of a small split are read once, a large
        split's reads stay within the bound."""
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        col = self._file(shard).read_row_group(group, columns=["pixels"]).column("pixels")
        arr = pixels_to_u8(col.to_pylist(), self.resolution)
        self._cache[key] = arr
        self._cached += arr.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return arr

    def split(self, split: str) -> "Split":
        self._check_split(split)
        return Split(self, split)

    def row_groups(self, split: str) -> list[dict]:
        """The split as row-group reads, in its order: ``{"shard", "group", "rows"}`` per Parquet
        row group holding rows of it (what :func:`hfedit.data.parquet.read_groups` reads, and the
        input of the Ray Data source ``pipelines.ray_runtime.split_dataset``)."""
        entry = self._check_split(split)
        G = int(self.meta["row_group"])
        groups: dict[tuple[int, int], list[int]] = {}
        for shard, row in zip(entry["shard"], entry["row"]):
            groups.setdefault((shard, row // G), []).append(row % G)
        return [{"shard": k, "group": g, "rows": rows} for (k, g), rows in sorted(groups.items())]

    def shard_uris(self) -> list[str]:
        """Every shard file, as a path or a URI of :attr:`fs`."""
        return [self.uri(s["file"]) for s in self.meta["shards"]]

    def split_filter(self, split: str):
        """The pyarrow expression that selects ``split``'s rows of the shards (by ``key``)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        self._check_split(split)
        val_max = pa.scalar(bytes.fromhex(self.meta["val_key_max"]), pa.binary())
        rect_max = pa.scalar(bytes.fromhex(self.meta.get("rectifier_key_max",
                                                         self.meta["val_key_max"])), pa.binary())
        if split == "val":
            by_key = pc.field("key") <= val_max
        elif split == "rectifier" and not self.meta["rectifier_shared"]:
            by_key = (pc.field("key") > val_max) & (pc.field("key") <= rect_max)
        else:
            by_key = pc.field("key") > rect_max
            split = "train"
        overrides = self.meta.get("key_overrides") or {}  # duplicates placed with their group
        if not overrides:
            return by_key
        moved = pa.array([bytes.fromhex(h) for h in overrides], pa.binary())
        here = pa.array([bytes.fromhex(h) for h, s in overrides.items() if s == split], pa.binary())
        return (by_key & ~pc.field("id").isin(moved)) | pc.field("id").isin(here)


class Split:
    """One split, read lazily: ``len``, ``shape``, ``ids`` and indexing (int, slice, index list
    or LongTensor) that reads only the images asked for."""

    def __init__(self, data: PreparedData, name: str):
        self.data, self.name = data, name

    def __len__(self) -> int:
        return self.data.count(self.name)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        r = self.data.resolution
        return (len(self), 3, r, r)

    @property
    def ids(self) -> list[str]:
        return self.data.ids(self.name)

    def __getitem__(self, key) -> torch.Tensor:
        import torch

        if isinstance(key, slice):
            return self.data.read(self.name, range(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            return self.data.read(self.name, [int(key)])[0]
        if isinstance(key, torch.Tensor):
            key = key.tolist()
        return self.data.read(self.name, list(key))

    def all(self) -> torch.Tensor:
        """Every image of the split (memory grows with the split: for small splits only)."""
        return self[:]


def load_split(prepared: str | os.PathLike, split: str) -> Split:
    """``split`` of a prepared folder, read lazily (:class:`Split`)."""
    return PreparedData(prepared).split(split)


__all__ = ["FORMAT", "PreparedData", "Split", "data_location", "load_split", "pixels_to_u8", "prepare_dataset"]
