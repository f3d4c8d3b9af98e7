"""Where a batch job reads and writes, and who may write there: the output location (a local
folder or a prefix on an object store) and its job lock, the inputs listed on a store, the
manifest logged from either, and the registered models (``models:/``) a job names, fetched for
it. Used by :mod:`pipelines.edit_batch` (the driver) and
:func:`pipelines.batch_job.list_inputs`. How each step differs on a store: docs/batch.md's
"Object storage".
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

from hfedit.data.images import ImageError
from hfedit.data.batch_manifest import MANIFEST
from hfedit.files import remove_temporaries
from hfedit.storage import Location, is_uri
from hfedit.validation import UsageError, check_output_folder, check_store
from hfedit.data.sources import iter_folder
from pipelines.batch_job import LOG_DIR, Entry, is_image_name


# ------------------------------------------------------------------------ the output
def lock_path(out: Path) -> Path:
    """Where the job lock of the output folder ``out`` lives: outside it (a folder removed and
    made again under a running job must not let a second job in), keyed by its absolute path,
    in ``$HFEDIT_LOCK_DIR`` (default: ``<temp dir>/hfedit-locks``)."""
    import tempfile

    folder = Path(os.environ.get("HFEDIT_LOCK_DIR") or Path(tempfile.gettempdir()) / "hfedit-locks")
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(os.fsencode(os.path.abspath(out))).hexdigest()[:24]
    return folder / f"edit_batch-{key}.lock"


@contextlib.contextmanager
def _locked(out: Path, attributes: list[str]) -> Iterator[None]:
    """One job at a time per output folder (resume and cleanup assume it): a lock on a file
    outside the folder (:func:`lock_path`), which the folder's removal does not release."""
    out.mkdir(parents=True, exist_ok=True)
    with open(lock_path(out), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another edit_batch job is writing to {out}") from None
        _remove_temporaries(out, attributes)
        yield


LOCK = "_lock.json"  # the job lock on an object store
LOCK_FRESH_S = 600.0  # a lock object not refreshed for this long is a dead job's: taken over
LOCK_REFRESH_S = 60.0


@contextlib.contextmanager
def _store_locked(out: Location, run: str) -> Iterator[None]:
    """One job at a time per output prefix on an object store, which has no file locks: a marker
    object ``<out>/_lock.json`` holding the job's run id, host and time, rewritten every minute
    while the job runs and deleted at its end. A marker refreshed within
    :data:`LOCK_FRESH_S` refuses a second job; an older one (a job killed without its cleanup)
    is taken over. A job reads its marker back after writing it and stops when another job's
    stands (the store's last writer wins); that narrows, but does not close, the window in which
    two jobs that both found no marker go on together: ``pyarrow.fs`` has no conditional write."""
    import json
    import socket
    import threading

    def read() -> dict:
        try:
            return json.loads(out.read_bytes(LOCK))
        except (FileNotFoundError, ValueError):
            return {}

    held = read()
    age = time.time() - float(held.get("time", 0))
    if held and age < LOCK_FRESH_S:
        raise UsageError(f"another edit_batch job (run {held.get('run')} on {held.get('host')}) "
                         f"is writing to {out}: its lock {out.name(LOCK)} was refreshed {age:.0f} s "
                         f"ago (a lock not refreshed for {LOCK_FRESH_S:.0f} s is taken over)")
    mine = {"run": run, "host": socket.gethostname(), "pid": os.getpid()}

    def write() -> None:
        out.write_bytes(LOCK, json.dumps({**mine, "time": time.time()}).encode())

    write()
    if read().get("run") != run:
        raise UsageError(f"another edit_batch job took the lock {out.name(LOCK)} at the same time")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(LOCK_REFRESH_S):
            with contextlib.suppress(OSError):
                write()

    thread = threading.Thread(target=beat, name="edit_batch-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if read().get("run") == run:
            out.delete(LOCK)


def output_location(out: str | os.PathLike) -> Location:
    """``--out`` checked before any work: a local folder that is or can be made (not a file), or
    a prefix on a reachable store that is not an object."""
    if not is_uri(out):
        return Location(check_output_folder(out))
    loc = check_store(str(out), "--out", output=True)
    return Location(check_output_folder(loc.local)) if loc.local is not None else loc



def _remove_temporaries(out: Path, attributes: list[str]) -> None:
    """Temporaries of this job's writers killed before their rename, where the job writes:
    ``<out>`` (the manifest), ``<out>/_log`` and ``<out>/<attribute>/`` of its attributes. Only
    names the atomic writer gives its temporaries (:func:`hfedit.files.is_temporary`): a user's
    own ``.*.tmp`` files are never touched."""
    remove_temporaries(out, recursive=False)
    remove_temporaries(out / LOG_DIR, recursive=False)
    for attribute in attributes:
        remove_temporaries(out / attribute)


# ------------------------------------------------------------------------ inputs on a store
def ignored_files(source: str | os.PathLike) -> list[str]:
    """The files of a folder input that are not images by their suffix (not inputs)."""
    if is_uri(source) and Location(source).local is None:
        loc = Location(source)
        return [] if loc.is_file() else [r for r in loc.files() if not is_image_name(r)]
    source = Path(source)
    if not source.is_dir():
        return []
    return sorted(e.id for e in iter_folder(source) if e.error is None and not is_image_name(e.id))


def input_location(source: str) -> Location:
    return check_store(source, "--input")  # a wrong endpoint, credentials or bucket fail here


def store_entries(loc: Location, root: Optional[str]) -> list[Entry]:
    """The inputs of a prefix on an object store (every object under it whose name has an image
    suffix) or of a list file stored there (lines relative to ``root``, default the list file's
    folder, or whole URIs)."""
    if loc.is_file():
        data = loc.read_bytes()
        if b"\x00" in data[:8192]:
            raise UsageError(f"--input {loc} is not a text file, not a prefix of images or a list "
                             "file: give a prefix of images or a text file of one image per line")
        base = Location(root) if root else Location(loc.text.rsplit("/", 1)[0])
        lines = [t.strip() for t in data.decode("utf-8", "surrogateescape").splitlines()]
        entries = [store_line(t, base) for t in lines if t and not t.startswith("#")]
    else:
        files = loc.files()
        if not files:
            raise UsageError(f"--input {loc}: no objects under this prefix (a folder of images on "
                             "the store, or a list file)")
        entries = [Entry(rel, loc.name(rel)) for rel in files if is_image_name(rel)]
    _store_signatures(entries)
    return entries


def store_line(text: str, base: Optional[Location]) -> Entry:
    """One line of a list file naming an object: a URI, or a path relative to ``base`` (which it
    must not leave). Its id: the path under ``base``, or for a URI elsewhere its bucket/key."""
    if not is_uri(text):
        rel = PurePosixPath(os.path.normpath("/" + text)).relative_to("/").as_posix()
        if base is None or text.startswith("/") or ".." in PurePosixPath(text).parts:
            return Entry(text, text, error=ImageError(
                "outside_root", text, f"listed path leaves the list's root {base} (set --root)"))
        return Entry(rel, base.name(rel))
    under = base is not None and text.startswith(base.text.rstrip("/") + "/")
    return Entry(text[len(base.text.rstrip("/")) + 1:] if under else text.split("://", 1)[1], text)


def _store_signatures(entries: list[Entry]) -> None:
    """Each stored input's signature (``<size>:<sha256 prefix>`` of its bytes, as for local
    files), read by 8 threads; an object that cannot be read gets its reason."""
    from concurrent.futures import ThreadPoolExecutor

    def sign(entry: Entry) -> None:
        if entry.error is not None:
            return
        try:
            data = Location(entry.input).read_bytes()
        except FileNotFoundError:
            entry.error = ImageError("not_a_file", entry.input, "no such object on the store")
            return
        except OSError as err:
            entry.error = ImageError("unreadable", entry.input, f"cannot read: {err}")
            return
        entry.signature = f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sign, entries))


def log_manifest(tracker, out: str) -> None:
    """The job's manifest as a run artifact (a store's is copied to a temporary file first)."""
    if not is_uri(out):
        tracker.log_artifact(Path(out) / MANIFEST)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / MANIFEST).write_bytes(Location(out).read_bytes(MANIFEST))
        tracker.log_artifact(Path(tmp) / MANIFEST)


# ------------------------------------------------------------------ registered models
BACKBONE_DEFAULT = "models/backbone"


def resolve_model_uris(args: argparse.Namespace) -> None:
    """``--edits models:/<name>@<alias>`` (or ``/<version>``): fetch that registered rectifier
    model into ``<out>/_models/`` (:func:`pipelines.serving.fetch_model`); ``--edits`` becomes its
    edits folder, ``--backbone`` (when not given) its backbone, and its attribute is added to
    ``--attributes``. ``--backbone models:/...`` takes the backbone of that model. With ``--out``
    on a store the models are fetched here and uploaded under ``<out>/_models/``, and the job
    reads them from there: every node fetches its own copy (no node is sent this one's path)."""
    if not is_uri(args.out):
        _fetch_registered(args, Path(args.out))
        return
    import tempfile

    from hfedit.storage import copy_tree, join

    with tempfile.TemporaryDirectory() as tmp:
        if not _fetch_registered(args, Path(tmp)):
            return
        if (Path(tmp) / "_models" / "rectifier").is_dir() and args.edits:
            raise UsageError(f"--edits {args.edits}: this edit shares the reconstruction "
                             "rectifier's trunk (edits.share_trunk), which it names by a relative "
                             "path a job on a store cannot follow: give a local --out")
        copy_tree(tmp, args.out)
        for flag in ("edits", "backbone"):
            value = getattr(args, flag)
            if value and Path(value).is_relative_to(tmp):
                setattr(args, flag, join(args.out, Path(value).relative_to(tmp).as_posix()))


def _fetch_registered(args: argparse.Namespace, local: Path) -> bool:
    """:func:`resolve_model_uris` into the local folder ``local``; whether anything was fetched."""
    from pipelines.serving import fetch_model

    fetched = False
    if args.edits and args.edits.startswith("models:/"):
        backbone, attribute = fetch_model(args.edits, local / "_models")
        args.edits = str(local / "_models" / "edits")
        if args.backbone == BACKBONE_DEFAULT:
            args.backbone = str(backbone)
        if args.attributes is not None and attribute not in args.attributes:
            args.attributes.append(attribute)
        fetched = True
    if args.backbone.startswith("models:/"):
        args.backbone = str(fetch_model(args.backbone, local / "_backbone")[0])
        fetched = True
    return fetched
