"""Files written whole or not at all: the one atomic writer, and the temporaries it leaves.

Every file hfedit writes for a user goes through :func:`atomic_write`: the content is written to a
temporary sibling ``.<name>.<pid>-<8 hex>.hfedit.tmp`` (a long name cut to a bounded
length plus its hash), given the mode a plain ``open()`` would
give it (``0666 & ~umask``: writers such as ``mkstemp`` and safetensors create 0600), and renamed
over ``<name>`` (``os.replace``), so a reader sees the old file or the new one, never half of one.
A folder is replaced the same way (:func:`replace_folder`).

A writer killed before its rename leaves its temporary behind; :func:`is_temporary` recognises
exactly those names (a user's ``.notes.tmp`` is not one), so a job can tidy up after itself
without touching anything else.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.hfedit\.(tmp|old)$")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback)
    os.umask(mask)
    return mask


NAME_MAX = 255  # bytes in one path component (Linux, macOS)
_KEEP = 180  # bytes of a long name a temporary keeps: 1 + 180 + 1 + 16 + the suffix's 30 < 255


def _sibling(path: Path, kind: str = "tmp") -> Path:
    """``.<name>.<pid>-<8 hex>.hfedit.<kind>``; a name over :data:`_KEEP` bytes is cut to its
    first bytes plus ``~`` and 16 hex of its sha256, so every name a file may have (up to
    :data:`NAME_MAX` bytes) has a temporary that is a valid name too."""
    name = path.name
    raw = os.fsencode(name)
    if len(raw) > _KEEP:
        import hashlib

        name = os.fsdecode(raw[:_KEEP - 17]) + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return path.with_name(f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.hfedit.{kind}")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary left by :func:`atomic_write` or :func:`replace_folder`."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporaries this module's writers left in ``folder`` (and below, when
    ``recursive``); nothing else is touched. Returns what was deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.hfedit.*") if recursive else folder.glob(".*.hfedit.*")
    removed = []
    for path in found:
        if not is_temporary(path) or path.is_symlink():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``.

    The file gets mode ``0666 & ~umask``; on any error (or interrupt) the temporary is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plain_modes(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` gives (``0666 & ~umask``):
    for folders written by libraries that create 0600 files (safetensors under diffusers'
    ``save_pretrained``), so a shared store copy stays readable by its other users."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def atomic_write_csv(path: str | os.PathLike, header: Sequence[Any],
                     rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file (``header`` then ``rows``), written whole."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_savefig(fig, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` through the atomic writer (the format comes from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def replace_folder(dest: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace the folder ``dest`` whole: ``fill(tmp)`` writes the new content into a temporary
    sibling folder, which is renamed to ``dest`` (the previous ``dest`` is renamed away first and
    deleted after). An error leaves ``dest`` as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest)
    tmp.mkdir()  # mode 0777 & ~umask, like any folder
    old = None
    try:
        fill(tmp)
        if dest.exists():
            old = _sibling(dest, "old")
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old, dest)
            old = None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
