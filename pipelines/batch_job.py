"""Batch editing, the job's data: what to edit, under which fingerprint, and what is done.

The inputs (a folder, a list file or a prepared split), per-image seeds and output paths, the
job (backbone, rectifiers, inversion settings and their fingerprints) and the done-log that makes
reruns skip finished images. Used by the driver (:mod:`pipelines.edit_batch`) and the Ray Data
actors (:mod:`pipelines.batch_actor`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional

from hfedit.files import NAME_MAX
from hfedit.models.checkpoint import file_digest, fingerprint
from hfedit.config import HfeditConfig, InversionConfig, to_flat_dict
from hfedit.data.batch_manifest import MANIFEST  # noqa: F401 (batch_output and edit_batch take it from here)
from hfedit.data.manifest import SPLITS, DatasetError, id_digest, load_manifest, printable
from hfedit.data.images import ImageError
from hfedit.data.sources import iter_folder
from hfedit.data.prepared import PreparedData
from hfedit.editing.editor import RECONSTRUCTION, available_edits
from hfedit.storage import Location, StorageError, is_uri, local_copy
from hfedit.validation import UsageError, check_list_file  # bad arguments: exit status 2

EXIT_OK, EXIT_CRASHED, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
LOG_DIR, COMPACTED = "_log", "0-compacted.jsonl"
EDIT_FAILED = "edit_failed"  # the image decoded but inversion/edit/writing raised
NOT_PROCESSED = "not_processed"  # the job stopped (crash, interrupt) before reaching it
WORKER_CRASHED = "worker_crashed"  # its worker process died edit_batch.max_attempts times on it
NO_SPACE = "no_space"  # its PNG could not be written: the disk is full (ENOSPC)
RETRIED = {"unreadable", EDIT_FAILED, NOT_PROCESSED, WORKER_CRASHED, NO_SPACE}  # a rerun tries these again
FORMAT = 1  # bump when the meaning of the outputs changes: every fingerprint changes with it
COLUMNS = ["id", "attribute", "status", "reason", "message", "input", "output", "seed", "l1", "ssim",
           "max_error", "decode_s", "invert_s", "edit_s", "write_s", "run", "worker_pid",
           "fingerprint", "signature", "integrity"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------ inputs
@dataclass
class Entry:
    """One input. ``id``: POSIX path relative to the root (or the prepared id); ``input``: the
    file (``<folder>/<split>#<index>`` for a prepared split); ``signature``: size and content digest,
    which change when the file does; ``error``: set when it must not be opened."""

    id: str
    input: str
    signature: str = ""
    index: int = -1
    error: Optional[ImageError] = None
    name: str = ""  # the output's path under <out>/<attribute>/ (:func:`output_names`)


# A folder is scanned for these (lower-case) suffixes; other files (notes, sidecars) are not
# inputs: they are counted as ignored, never failures (links leaving the folder, dangling links
# and special files are still reported, whatever their names). A list file's entries are all
# inputs.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif",
                            ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})


def is_image_name(id_: str) -> bool:
    return PurePosixPath(id_).suffix.lower() in IMAGE_SUFFIXES


def output_names(ids: list[str]) -> dict[str, str]:
    """``{id: output name}``: the id with its suffix replaced by ``.png`` (``a.png`` -> ``a.png``,
    ``faces/b.jpg`` -> ``faces/b.png``); ids whose short names collide (``a.jpg`` beside
    ``a.png``, or ``x.jpg`` beside a folder ``x.png/`` whose outputs lie under ``x.png/``) keep
    their suffix (``a.jpg.png``; ``a.png`` keeps ``a.png``). Names that still collide are left
    out: :func:`list_inputs` refuses them (``name_collision``)."""
    short = {i: str(PurePosixPath(i).with_suffix(".png")) if PurePosixPath(i).suffix else f"{i}.png"
             for i in ids}
    users = Counter(short.values())
    folders = {str(p) for n in short.values() for p in PurePosixPath(n).parents}
    names = {i: n if (users[n] == 1 and n not in folders) or i == n else f"{i}.png"
             for i, n in short.items()}
    folders = {str(p) for n in names.values() for p in PurePosixPath(n).parents}
    users = Counter(names.values())
    return {i: n for i, n in names.items() if i == n or (users[n] == 1 and n not in folders)}


def _too_long(name: str) -> bool:
    return any(len(os.fsencode(part)) > NAME_MAX for part in PurePosixPath(name).parts)


def _signature(path: Path) -> str:
    """``<size>:<sha256 prefix>`` of the file's bytes: what the input is, not when it was written,
    so a copied or moved project (new mtimes, same content) redoes nothing. One read of each
    input per run (the images are then decoded from the page cache)."""
    try:  # never blocks on a FIFO; reads regular files only
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return ""
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
            return f"{os.fstat(f.fileno()).st_size}:{digest}"
    except OSError:
        return ""


def list_inputs(source: str | os.PathLike, split: Optional[str] = None,
                root: Optional[str | os.PathLike] = None) -> list[Entry]:
    """Every input of a folder (recursive, :func:`hfedit.data.sources.iter_folder`), a list file, or the
    ``split`` of a prepared dataset folder, sorted by id, duplicates dropped."""
    if is_uri(source):
        from pipelines.batch_store import input_location, store_entries

        loc = input_location(source)
        if loc.local is None and split is not None:
            raise UsageError(f"--input {source} --split {split}: a prepared split is read from "
                             "a local or mounted folder; give its path")
        if loc.local is None:  # on an object store
            return _unique(store_entries(loc, root))
        source = loc.local  # file://
    source = Path(source).absolute()
    if split is not None:
        entries = _split_entries(source, split)
    elif source.is_dir():
        entries = [Entry(e.id, str(e.path), _signature(e.path), error=e.error)
                   for e in iter_folder(source) if e.error is not None or is_image_name(e.id)]
    elif source.is_file():
        entries = _listed_entries(check_list_file(source), Path(root) if root else source.parent)
    else:
        raise UsageError(f"--input {source}: no such folder or list file")
    return _unique(entries)


def _unique(entries: list[Entry]) -> list[Entry]:
    """Sorted by id, duplicates dropped, each with its output name or why it has none."""
    unique: dict[str, Entry] = {}
    for entry in entries:
        unique.setdefault(entry.id, entry)
    names = output_names(list(unique))
    for entry in unique.values():
        entry.name = names.get(entry.id, "")
        if entry.error is not None or entry.index >= 0:
            continue
        if not entry.name:
            entry.error = ImageError("name_collision", entry.input, "its output name is also the "
                                     "name of another input's output or of a folder of outputs")
        elif _too_long(entry.name):
            entry.error = ImageError("name_too_long", entry.input, f"its output name {entry.name!r} "
                                     f"is over {NAME_MAX} bytes")
    return sorted(unique.values(), key=lambda e: e.id)


def _split_entries(folder: Path, split: str) -> list[Entry]:
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {SPLITS}")
    try:
        manifest = load_manifest(folder)
        PreparedData(folder)  # the shards' format is one this hfedit reads
    except (FileNotFoundError, DatasetError) as err:
        raise UsageError(f"--input {folder} --split {split}: {err}") from None
    path = folder / split  # "<folder>/<split>#<index>": a row of the prepared split
    sig = f"prepared:{PreparedData(folder).digest}"  # the split's content, wherever it lies
    return [Entry(r.id, f"{path}#{r.index}", sig, index=r.index)
            for r in manifest.rows if r.split == split]


def _listed_entries(list_file: Path, root: Path) -> list[Entry]:
    """One entry per non-empty, non-# line; paths leaving ``root`` (lexically or by a link),
    missing files, folders and special files get their reason, as in :func:`iter_folder`."""
    root_abs = Path(os.path.normpath(root.absolute()))
    real_root = root.resolve()
    entries = []
    for line in list_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if is_uri(text):  # an object on a store: listed by its URI
            from pipelines.batch_store import store_line

            entries.append(store_line(text, None))
            continue
        path = Path(os.path.normpath((root_abs / text).absolute()))
        try:
            id_ = path.relative_to(root_abs).as_posix()
        except ValueError:
            entries.append(Entry(text, str(path), error=ImageError(
                "outside_root", path, f"listed path is outside the root {root_abs} (set --root)")))
            continue
        real, error = resolved(path), None
        if real is None:
            error = ImageError("broken_link", path, "a symlink loop")
        elif not real.is_relative_to(real_root):
            error = ImageError("outside_root", path,
                               f"leads to {real}, outside {real_root}; not followed")
        elif path.is_symlink() and not real.exists():
            error = ImageError("broken_link", path, f"dangling symlink to {real}")
        elif not real.exists():
            error = ImageError("not_a_file", path, "no such file")
        elif not real.is_file():
            error = ImageError("not_a_file", path, "a folder or special file, not a regular file")
        entries.append(Entry(id_, str(path), _signature(path), error=error))
    return entries


def resolved(path: str | os.PathLike) -> Optional[Path]:
    """``Path(path).resolve()``, or None for a symlink loop (Python < 3.13 raises RuntimeError,
    later versions OSError(ELOOP))."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return None


def image_seed(global_seed: int, id_: str) -> int:
    """The noise seed of image ``id_``: a function of its id alone (its bytes, so any file name
    works), never of the scheduling."""
    return int.from_bytes(id_digest(global_seed, id_)[:8], "big") >> 1


# Fields that may hold a file name. Arrow (Ray Data's blocks, pandas' strings, parquet) takes only
# valid UTF-8, and a name that is not UTF-8 holds surrogates in Python: such names cross Ray as
# their bytes read as latin-1 (to_wire/from_wire, reversible) and reach the manifest escaped.
TEXT_FIELDS = ("id", "input", "output", "message", "name")


def _bytes_as_latin1(text: str) -> str:
    return os.fsencode(text).decode("latin-1")


def _latin1_as_name(text: str) -> str:
    return os.fsdecode(text.encode("latin-1"))


def _map_text(row: dict, fn: Callable[[str], str]) -> dict:
    return {k: fn(v) if k in TEXT_FIELDS and isinstance(v, str) else v for k, v in row.items()}


def to_wire(row: dict) -> dict:
    """A row (or item) whose file names Arrow can carry; :func:`from_wire` undoes it."""
    return _map_text(row, _bytes_as_latin1)


def from_wire(row: dict) -> dict:
    return _map_text(row, _latin1_as_name)


def to_display(row: dict) -> dict:
    """A row for the manifest: names that are not UTF-8 with ``\\xNN`` escapes."""
    return _map_text(row, printable)


def output_relpath(attribute: str, name: str) -> str:
    """``<attribute>/<name>``, ``name`` an output name from :func:`output_names`."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise ValueError(f"output name {name!r} is not a relative path inside the output")
    return f"{attribute}/{name}"


# --------------------------------------------------------------------------- the job
@dataclass
class Job:
    """Everything an actor needs; the same for every actor of a run."""

    backbone: str
    out: str
    run: str
    attributes: list[str]
    edits_dir: str  # edit rectifiers: <edits_dir>/<attribute>/
    fingerprints: dict[str, str]  # attribute -> fingerprint of what its outputs depend on
    inversion: InversionConfig
    max_pixels: int
    center_crop: bool
    torch_threads: int = 1
    device: str = "cpu"  # what the model actor resolves (pipelines.ray_runtime.actor_gpus)
    precision: str = "fp32"
    pid_dir: str = ""
    max_attempts: int = 2
    root: str = ""  # a folder or list file's root: decoding refuses files that lie outside it
    require_verified: bool = False  # data.require_verified: refuse formats that can hide damage


def _tree_digest(path: str | os.PathLike) -> str:
    """Digest of every file under a local folder (a store copy's marker left out), or of a hub id."""
    path = Path(path)
    if not path.exists():
        return f"id:{path}"
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".hfedit-")) \
        if path.is_dir() else [path]
    return fingerprint([(p.relative_to(path).as_posix() if path.is_dir() else p.name, file_digest(p))
                        for p in files])


def check_attributes(attributes: list[str], edits_dir: str | os.PathLike) -> dict[str, str]:
    """attribute -> rectifier folder ("" for reconstruction); fails fast naming the attribute
    and the folder when an edit rectifier is missing."""
    if not attributes:
        raise UsageError("no attributes requested (--attributes / edit_batch.attributes)")
    if is_uri(edits_dir) and any(a != RECONSTRUCTION for a in attributes):
        try:  # a folder of rectifiers on a store: checked and fingerprinted in this node's copy
            edits_dir = local_copy(edits_dir)
        except (OSError, StorageError) as err:
            raise UsageError(f"--edits {edits_dir}: {err}") from None
    edits_dir = Path(edits_dir)
    have = available_edits(edits_dir)
    folders = {}
    for name in attributes:
        if not _NAME.match(name):
            raise UsageError(f"attribute {name!r}: use letters, digits, '_', '-' and '.'")
        if name != RECONSTRUCTION and name not in have:
            raise UsageError(
                f"attribute '{name}': no edit rectifier in {edits_dir / name}/ (rectifier.safetensors "
                f"+ rectifier.json). Train it (stage train_edits, params.yaml edits.attributes.{name}) "
                f"or drop it from --attributes. Available: {[RECONSTRUCTION, *have]}")
        folders[name] = "" if name == RECONSTRUCTION else str((edits_dir / name).resolve())
    return dict(sorted(folders.items()))


def make_job(cfg: HfeditConfig, backbone: str, out: Location, rectifiers: dict[str, str],
             split_input: bool, pid_dir: str = "", root: str = "") -> Job:
    """The job's settings, fingerprints and run id. Locations on a store (``--out``,
    ``--backbone``, ``--edits``) stay URIs: each process fetches models into its own node's
    cache (:func:`hfedit.storage.local_copy`)."""
    eb, inv = cfg.edit_batch, cfg.inversion
    out = out if isinstance(out, Location) else Location(out)
    local = Path(backbone)
    if is_uri(backbone):  # fingerprinted in this node's copy; the job keeps the URI
        try:
            local = local_copy(backbone)
        except (OSError, StorageError) as err:
            raise UsageError(f"--backbone {backbone}: {err}") from None
    elif not local.exists() and (backbone.startswith((".", "/")) or backbone.count("/") != 1):
        raise UsageError(f"--backbone {backbone}: no such folder (the backbone stage writes "
                         "models/backbone) and not a hub id 'owner/name'")
    common = {"format": FORMAT, "backbone": _tree_digest(local if is_uri(backbone) else backbone),
              "inversion": to_flat_dict(inv),
              "preprocess": "prepared" if split_input else [
                  cfg.data.max_pixels, cfg.data.center_crop,
                  # only when set (the default's fingerprints stay): turning it on redoes the
                  # batch, so an unverified file edited before is refused now
                  *(["require_verified"] if cfg.data.require_verified else [])]}
    prints = {a: fingerprint({**common, "attribute": a, "rectifier": _tree_digest(f) if f else None})
              for a, f in rectifiers.items()}
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    return Job(str(local.resolve()) if not is_uri(backbone) and local.exists() else backbone,
               str(out.local.resolve()) if out.local is not None else out.text, run,
               list(rectifiers),
               eb.edits_dir if is_uri(eb.edits_dir) else str(Path(eb.edits_dir).resolve()), prints, inv,
               cfg.data.max_pixels, cfg.data.center_crop, eb.torch_threads, cfg.runtime.device,
               cfg.runtime.precision.value, str(Path(pid_dir).absolute()) if pid_dir else "",
               eb.max_attempts, str(Path(root).resolve()) if root and not is_uri(root) else "",
               cfg.data.require_verified)


# ------------------------------------------------------------------------ done log
class DoneIndex:
    """What ``<out>/_log/*.jsonl`` says: ``rows``, latest per (id, attribute), and ``attempts``
    per (run, id) (how often a worker started on the image). Read incrementally; a line torn by a
    killed process or a full disk (its checksum does not match) is ignored."""

    def __init__(self, out: str | os.PathLike | Location) -> None:
        self.out = out if isinstance(out, Location) else Location(out)
        self.folder = Path(self.out.local or ".") / LOG_DIR  # (local outputs)
        self.rows: dict[tuple[str, str], dict] = {}
        self.attempts: Counter[tuple[str, str]] = Counter()
        self._offsets: dict[str, int] = {}

    def _new_data(self) -> Iterator[tuple[str, int, bytes]]:
        """(log name, offset, bytes after it) of every log: local logs grow by appends (read
        from where the last refresh stopped); a store's are objects written once (read once)."""
        if self.out.local is not None:
            for path in sorted(self.folder.glob("*.jsonl")):
                start = self._offsets.get(path.name, 0)
                with open(path, "rb") as f:
                    f.seek(start)
                    yield path.name, start, f.read()
            return
        for rel in self.out.files(LOG_DIR, recursive=False):
            if rel.endswith(".jsonl") and rel not in self._offsets:
                try:
                    yield rel, 0, self.out.read_bytes(rel)
                except FileNotFoundError:  # compacted away since the listing
                    continue

    def refresh(self) -> "DoneIndex":
        for name, start, data in self._new_data():
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                row = parse_log_line(line)
                if row is None:  # torn or garbled: as if never written
                    continue
                try:
                    if "attempt" in row:
                        self.attempts[(row["run"], row["attempt"])] += 1
                    else:
                        self.rows[(row["id"], row["attribute"])] = row
                except (ValueError, KeyError, TypeError):
                    continue
            self._offsets[name] = start + end
        return self


def is_complete(row: Optional[dict], signature: str, fingerprint_: str,
                out: Path | Location, present: Optional[dict[str, int]] = None) -> bool:
    """Whether a logged row still stands: same input file, same job, the PNG as it was written
    (size and sha256 from the row; rows logged before they were recorded: the PNG exists), or
    for errors: a failure a rerun would repeat. On an object store the PNG's size is checked
    (``present``: the output's listing, name -> size, when the caller has it; else one HEAD):
    objects are written whole by one PUT, and reading each back for its digest would cost a
    download per image."""
    if row is None or row.get("signature") != signature or row.get("fingerprint") != fingerprint_:
        return False
    if isinstance(out, Location):
        if out.local is None:
            if row["status"] != "ok":
                return row.get("reason") not in RETRIED
            size = present.get(row["output"]) if present is not None else out.size(row["output"])
            return size is not None and size == row.get("out_bytes", size)
        out = out.local
    if row["status"] == "ok":
        path = out / row["output"]
        if "out_sha256" not in row:
            return path.is_file()
        try:
            if path.stat().st_size != row.get("out_bytes"):
                return False
            return hashlib.sha256(path.read_bytes()).hexdigest() == row["out_sha256"]
        except OSError:
            return False
    return row.get("reason") not in RETRIED


_CRC = ', "crc": "'


def log_line(row: dict) -> str:
    """One done-log line: the row's JSON with a last key ``crc``, 16 hex of the sha256 of the
    JSON before it, so a line torn or garbled in any way is recognised (:func:`parse_log_line`)."""
    text = json.dumps(row, default=float)
    crc = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{text[:-1]}{_CRC}{crc}\"}}\n"


def parse_log_line(line: bytes) -> Optional[dict]:
    """The row of a :func:`log_line` line, or None when its checksum does not match (a line of
    an older log without ``crc`` is taken as it is)."""
    try:
        text = line.decode()
        at = text.rfind(_CRC)
        if at >= 0:
            body, crc = text[:at] + "}", text[at + len(_CRC):].rstrip()
            if crc != hashlib.sha256(body.encode()).hexdigest()[:16] + '"}':
                return None
            text = body
        row = json.loads(text)
        return row if isinstance(row, dict) else None
    except ValueError:
        return None


class DoneLog:
    """This process's append-only log: one line per row, one write + fsync per image. On an
    object store (no append) each call writes one small object
    ``_log/<run>-<pid>-<6 hex>-<k>.jsonl``; the job compacts them at its end."""

    def __init__(self, out: Path | Location, run: str) -> None:
        self.out = out if isinstance(out, Location) else Location(out)
        self.name = f"{run}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = Path(self.out.local or ".") / LOG_DIR / f"{self.name}.jsonl"
        self._file = None
        self._objects = 0

    def append(self, rows: list[dict]) -> None:
        if self.out.local is None:
            self._objects += 1
            self.out.write_bytes(f"{LOG_DIR}/{self.name}-{self._objects:06d}.jsonl",
                                 "".join(log_line(r) for r in rows).encode())
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        end = os.fstat(self._file.fileno()).st_size  # every earlier write is flushed
        try:
            self._file.write("".join(log_line(r) for r in rows))  # one write
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:  # a full disk: the rows stay unlogged (a rerun redoes them)
            if err.errno != errno.ENOSPC:
                raise
            with contextlib.suppress(OSError):  # its buffer holds the failed write
                self._file.close()
            self._file = None  # reopened by the next append, after the torn tail is cut
            with open(self.path, "r+b") as f:
                f.truncate(end)
