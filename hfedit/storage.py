"""Where hfedit reads and writes: a local path or an object-store URI, through one interface.

A :class:`Location` is a folder named by a local path or a URI (``s3://bucket/prefix``,
``gs://...``, ``file:///nfs/x``, anything ``pyarrow.fs.FileSystem.from_uri`` takes). It lists,
reads and writes files by their names relative to it:

- reads are whole objects as bytes (images are decoded from bytes);
- a write is atomic either way: locally a temporary sibling renamed over the name
  (:func:`hfedit.files.atomic_write_bytes`); on an object store one PUT of the whole object
  (S3 URIs get ``allow_delayed_open``, which turns pyarrow's multipart upload of three requests
  into one PutObject), which readers see whole or not at all;
- nothing relies on append or rename on a store: the batch job's done-log is one small object
  per finished image there (:mod:`pipelines.batch_job`).

Why pyarrow.fs and not fsspec: the prepared dataset already reads through it, Ray Data and Ray
Train take its filesystems (``storage_path``), and its S3 client is native, so one set of
credentials and one endpoint setting (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, or the URI's query) serve every reader.
(s3fs is in the environment for DVC's S3 remote only.)

``python -m hfedit.storage SOURCE DEST`` copies a folder up to a store or down from one
(:func:`copy_tree`). Models on a store reach a process as a local folder: :func:`local_copy` copies a folder URI
into this machine's cache (``$HFEDIT_CACHE``, default ``~/.cache/hfedit``) once per content
listing, so every node fetches its own copy and no process is sent another node's path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Optional

from hfedit.files import atomic_write_bytes, replace_folder

# a scheme followed by "//": models:/ names of the MLflow registry are not storage URIs
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(OSError):
    """A location that cannot be reached or read, with the location and the fix in its text."""


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI (``s3://``, ``file://``, ...) rather than a local path."""
    return bool(_URI.match(str(location)))


def join(location: str, rel: str) -> str:
    """``location/rel`` for a path or a URI (a URI's query stays at its end)."""
    if not rel:
        return location
    base, sep, query = location.partition("?")
    return f"{base.rstrip('/')}/{rel}{sep}{query}"


def filesystem(location: str | os.PathLike):
    """``(pyarrow filesystem, path in it)`` of a local path or a URI. The filesystem of an S3 or
    GCS bucket is made once per process and bucket (making one resolves the bucket's region)."""
    from pyarrow import fs

    text = str(location)
    if not is_uri(text):
        return fs.LocalFileSystem(), str(Path(text).absolute())
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme in ("s3", "gs", "gcs") and parts.netloc:
        env = tuple(os.environ.get(k, "") for k in _STORE_ENV)  # a changed endpoint: a new one
        return _bucket_fs(_bucket_uri(parts), env), (parts.netloc + parts.path).rstrip("/")
    return _from_uri(text)


_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
              "AWS_REGION", "AWS_DEFAULT_REGION")


def _bucket_uri(parts) -> str:
    """``scheme://bucket?query``: what a bucket's filesystem depends on."""
    return f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")


@functools.lru_cache(maxsize=32)
def _bucket_fs(bucket: str, env: tuple[str, ...]):
    return _from_uri(bucket)[0]


def _from_uri(text: str):
    from pyarrow import fs

    if text.startswith("s3://") and "allow_delayed_open" not in text:
        text += ("&" if "?" in text else "?") + "allow_delayed_open=true"  # one PUT per object
    try:
        return fs.FileSystem.from_uri(text)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ValueError/OSError/ArrowInvalid
        raise StorageError(f"{text}: cannot open this location ({type(err).__name__}: {err}); "
                           "check the URI's scheme and the store's credentials (AWS_ACCESS_KEY_ID, "
                           "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server)"
                           ) from None


class Location:
    """A folder by local path or URI. ``local`` is its local path (a path or a ``file://`` URI),
    None on an object store. Names given to its methods are POSIX paths relative to it."""

    def __init__(self, location: str | os.PathLike) -> None:
        from pyarrow import fs

        self.text = str(location)
        self.fs, root = filesystem(self.text)
        self.root = root.rstrip("/") or root
        self.local: Optional[Path] = (Path(self.root) if isinstance(self.fs, fs.LocalFileSystem)
                                      else None)

    def __repr__(self) -> str:
        return f"Location({self.text!r})"

    def __str__(self) -> str:
        return self.text

    def name(self, rel: str = "") -> str:
        """How a user names ``rel``: the URI or path they gave, joined with it."""
        return join(self.text, rel) if is_uri(self.text) else str(Path(self.text) / rel) if rel \
            else self.text

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _info(self, rel: str):
        try:
            return self.fs.get_file_info(self._path(rel))
        except OSError as err:
            raise StorageError(f"{self.name(rel)}: {err}") from None

    def is_file(self, rel: str = "") -> bool:
        from pyarrow import fs

        return self._info(rel).type == fs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        from pyarrow import fs

        return self._info(rel).type == fs.FileType.Directory

    def size(self, rel: str) -> Optional[int]:
        """The file's size in bytes, None when there is no such file."""
        from pyarrow import fs

        info = self._info(rel)
        return int(info.size) if info.type == fs.FileType.File else None

    def read_bytes(self, rel: str = "") -> bytes:
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                raise FileNotFoundError(f"{self.name(rel)}: no such file") from None
            raise StorageError(f"{self.name(rel)}: cannot read ({err})") from None

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` whole (locally: temporary + fsync + rename; on a store: one
        PUT). Returns the name written."""
        if self.local is not None:
            atomic_write_bytes(self.local / rel, data)
        else:
            try:
                with self.fs.open_output_stream(self._path(rel)) as f:
                    f.write(data)
            except OSError as err:
                raise StorageError(f"{self.name(rel)}: cannot write ({err})") from None
        return self.name(rel)

    def files(self, rel: str = "", recursive: bool = True) -> dict[str, int]:
        """``{name relative to this location: size}`` of the files under ``rel`` (none when it
        does not exist), sorted by name."""
        from pyarrow import fs

        base = self._path(rel)
        try:
            infos = self.fs.get_file_info(fs.FileSelector(base, recursive=recursive,
                                                          allow_not_found=True))
        except NotADirectoryError:
            return {}
        except OSError as err:
            raise StorageError(f"{self.name(rel)}: cannot list ({err})") from None
        found = {}
        for info in infos:
            if info.type == fs.FileType.File:
                found[PurePosixPath(info.path).relative_to(self.root).as_posix()] = int(info.size)
        return dict(sorted(found.items()))

    def check_bucket(self) -> None:
        """Raise :class:`StorageError` naming the fix when this location's bucket (the first
        component of its path on an object store) does not exist; nothing for local paths."""
        from pyarrow import fs

        if self.local is not None:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != fs.FileType.NotFound
        except OSError as err:
            raise StorageError(f"{self.text}: cannot reach the store ({err}); check the "
                               "endpoint (AWS_ENDPOINT_URL) and the credentials") from None
        if not found:
            raise StorageError(f"{self.text}: the bucket {bucket!r} does not exist (or these "
                               "credentials cannot see it): create it or fix the URI")

    def delete(self, rel: str) -> None:
        """Delete the file ``rel`` (nothing when it is gone already)."""
        try:
            self.fs.delete_file(self._path(rel))
        except FileNotFoundError:
            pass
        except OSError as err:
            if self.size(rel) is not None:
                raise StorageError(f"{self.name(rel)}: cannot delete ({err})") from None

    def contains(self, other: "Location") -> bool:
        """Whether ``other`` lies inside this location (the same store and under its root)."""
        if (self.local is None) != (other.local is None):
            return False
        if self.local is not None:
            return other.local.resolve().is_relative_to(self.local.resolve())
        return type(self.fs) is type(other.fs) and (other.root + "/").startswith(self.root + "/")


def cache_root() -> Path:
    """This machine's cache of store copies: ``$HFEDIT_CACHE``, default ``~/.cache/hfedit``."""
    return Path(os.environ.get("HFEDIT_CACHE") or Path.home() / ".cache" / "hfedit")


def local_copy(location: str | os.PathLike) -> Path:
    """A local folder holding the folder ``location``: itself when it is local; for a URI a copy
    in :func:`cache_root` under ``store/<sha256 of the URI>``, fetched again only when the
    listing (names and sizes) changed, and replaced whole (a reader never sees half a copy)."""
    loc = Location(location)
    if loc.local is not None:
        return loc.local
    listing = loc.files()
    if not listing:
        raise FileNotFoundError(f"{location}: no files there (a model folder on a store holds its "
                                "files under this prefix)")
    dest = cache_root() / "store" / hashlib.sha256(loc.text.encode()).hexdigest()[:24]
    stamp = json.dumps({"location": loc.text, "files": listing}, sort_keys=True)
    marker = dest / ".hfedit-listing.json"
    if marker.is_file() and marker.read_text() == stamp:
        return dest

    def fill(tmp: Path) -> None:
        for rel in listing:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(loc.read_bytes(rel))
        (tmp / marker.name).write_text(stamp)

    return replace_folder(dest, fill)


def copy_tree(source: str | os.PathLike, dest: str | os.PathLike, last: tuple[str, ...] = (),
              names: Optional[tuple[str, ...]] = None) -> dict[str, int]:
    """Copy every file under the folder ``source`` to ``dest`` (each a path or a URI: up to a
    store, down from one, or between two), each written whole; returns ``{name: size}``.
    ``last``: names whose presence tells a reader the folder is complete (a checkpoint's JSON
    sidecar): deleted from ``dest`` first and written after every other file. ``names``: only
    these files of ``source``, each required (a missing one is refused before anything is
    written: a checkpoint without its sidecar must not be copied as if whole)."""
    src, out = Location(source), Location(dest)
    files = {rel: size for rel, size in src.files().items() if names is None or rel in names}
    missing = sorted(set(names or ()) - set(files))
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)}; nothing was copied")
    if not files:
        raise FileNotFoundError(f"{source}: no files to copy")
    for rel in last:
        out.delete(rel)
    for rel in sorted(files, key=lambda rel: rel in last):
        out.write_bytes(rel, src.read_bytes(rel))
    return files


def remove_tree(location: str | os.PathLike) -> None:
    """Delete every file under ``location`` (a store's prefix or a local folder)."""
    loc = Location(location)
    if loc.local is not None:
        import shutil

        shutil.rmtree(loc.local, ignore_errors=True)
        return
    for rel in loc.files():
        loc.delete(rel)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m hfedit.storage SOURCE DEST``: copy a folder to or from a store."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m hfedit.storage", description=(
        "Copy a folder (models, photos) to or from object storage: SOURCE and DEST are local "
        "paths or URIs (s3://bucket/prefix; AWS_ENDPOINT_URL for an S3-compatible server)."))
    parser.add_argument("source")
    parser.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        files = copy_tree(args.source, args.dest)
    except OSError as err:
        print(f"hfedit.storage: {err}", file=sys.stderr)
        return 2
    print(f"copied {len(files)} files ({sum(files.values()) / 1e6:.1f} MB) to {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
