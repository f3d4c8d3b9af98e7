"""Checking inputs before any work: one layer every front end (the CLI, edit_batch, the stages)
goes through, so bad values fail at once with the value, the rule, and where to fix it.

* :func:`check_config` checks the values the schema's types cannot (``inversion.num_steps >= 1``,
  ``0 <= skip < num_steps``, positive Ray resources, ...); :func:`hfedit.config.load_config` calls
  it on every config it returns, raising :class:`hfedit.config.ConfigError`.
* :func:`check_output_folder` and :func:`check_list_file` check the paths a command is given,
  raising :class:`UsageError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from hfedit.device import check_device_spec

# key -> (rule holds for a value, rule in words, the flag that sets it, if a front end has one)
_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "inversion.num_steps": (lambda v: v >= 1, "at least 1", "--steps"),
    "inversion.eta": (lambda v: v >= 0, "0 or more (0: deterministic DDIM-like, 1: DDPM)", "--eta"),
    "inversion.skip": (lambda v: v >= 0, "0 or more", "--skip"),
    "data.resolution": (lambda v: v > 0, "positive", ""),
    "data.max_pixels": (lambda v: v > 0, "positive", ""),
    "data.max_images": (lambda v: v >= 0, "0 (all) or more", ""),
    "data.val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)", ""),
    "data.rectifier_fraction": (lambda v: 0 <= v < 1, "in [0, 1)", ""),
    "data.shard_images": (lambda v: v >= 1, "1 or more", ""),
    "data.workers": (lambda v: v >= 0, "0 (one per CPU) or more", ""),
    "edit_batch.actors": (lambda v: v >= 1, "at least 1", "--actors"),
    "edit_batch.batch_size": (lambda v: v >= 1, "at least 1", "--batch-size"),
    "edit_batch.num_cpus": (lambda v: v > 0, "positive (fractions allowed, e.g. 0.5)", "--num-cpus"),
    "edit_batch.num_gpus": (lambda v: v >= 0, "0 or more", "--num-gpus"),
    "edit_batch.torch_threads": (lambda v: v >= 0, "0 or more", ""),
    "edit_batch.max_attempts": (lambda v: v >= 1, "at least 1", ""),
    "evaluate.images": (lambda v: v >= 1, "at least 1", ""),
    "evaluate.gap_timesteps": (lambda v: v >= 1, "at least 1", ""),
    "pretrain.eval_gap_timesteps": (lambda v: v >= 1, "at least 1", ""),
    "runtime.eval_batch_size": (lambda v: v >= 1, "at least 1", ""),
}


class UsageError(ValueError):
    """A bad argument (a path of the wrong kind, ...), found before any work (exit status 2)."""


def _where(key: str) -> str:
    flag = _RULES[key][2] if key in _RULES else ""
    return (f"{flag}, " if flag else "") + f"--set {key}=... or params.yaml"


def config_problems(cfg) -> list[str]:
    """Every rule ``cfg`` (an :class:`hfedit.config.HfeditConfig`) breaks, in words."""
    problems = []
    for key, (ok, rule, _) in _RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            problems.append(f"{key}={value} must be {rule} (set by {_where(key)})")
    inv = cfg.inversion
    if inv.num_steps >= 1 and not inv.skip < inv.num_steps:
        problems.append(f"inversion.skip={inv.skip} must be less than inversion.num_steps="
                        f"{inv.num_steps}: it skips that many of the N steps (set by "
                        f"{_where('inversion.skip')}, or raise {_where('inversion.num_steps')})")
    d = cfg.data
    if 0 <= d.val_fraction < 1 and 0 <= d.rectifier_fraction < 1 \
            and d.val_fraction + d.rectifier_fraction >= 1:
        problems.append(f"data.val_fraction + data.rectifier_fraction = "
                        f"{d.val_fraction + d.rectifier_fraction} must be less than 1: the backbone "
                        f"needs images of its own (set by {_where('data.rectifier_fraction')})")
    T = cfg.backbone.scheduler.num_train_timesteps
    for name, attr in cfg.edits.attributes.items():
        key = f"edits.attributes.{name}.t_max"
        if getattr(attr.large_t, "value", attr.large_t) == "range" and not 1 <= attr.t_max <= T:
            problems.append(f"{key}={attr.t_max} must be in [1, {T}] (backbone.scheduler."
                            f"num_train_timesteps) with large_t=range (set by --set {key}=... or "
                            "params.yaml)")
    if not 0 <= cfg.edits.markovian.t0 < T:
        problems.append(f"edits.markovian.t0={cfg.edits.markovian.t0} must be in [0, {T}) "
                        "(set by --set edits.markovian.t0=... or params.yaml)")
    try:
        check_device_spec(cfg.runtime.device)
    except ValueError as err:
        problems.append(f"{err} (set by --device, --set runtime.device=... or conf/runtime.yaml)")
    from hfedit.config.schema import SIDE_BY_SIDE

    unknown = sorted(set(cfg.evaluate.side_by_side) - set(SIDE_BY_SIDE))
    if unknown:
        problems.append(f"evaluate.side_by_side={list(cfg.evaluate.side_by_side)}: {unknown} "
                        f"unknown; give a subset of [{', '.join(SIDE_BY_SIDE)}] ([] = neither)")
    if any(not 0 < v <= 1 for v in cfg.evaluate.sdedit_strengths):
        problems.append(f"evaluate.sdedit_strengths={list(cfg.evaluate.sdedit_strengths)}: each "
                        "must be in (0, 1] (set by --set evaluate.sdedit_strengths=[...] or "
                        "params.yaml)")
    if any(n < 1 for n in cfg.evaluate.steps):
        problems.append(f"evaluate.steps={list(cfg.evaluate.steps)}: every N must be at least 1 "
                        "(set by --set evaluate.steps=[...] or params.yaml)")
    return problems


def check_config(cfg, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` listing every rule ``cfg`` breaks (nothing when it breaks none)."""
    problems = config_problems(cfg)
    if problems:
        raise error("; ".join(problems))


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` is a folder or can be created as one: not an existing file, not under one."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                what = "is a file" if folder == path else f"is under {folder}, which is a file"
                raise UsageError(f"{flag} {path} {what}, not a folder: give a folder for the "
                                 "outputs (it is created when missing)")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: {folder} is not writable: give a folder you "
                                 "can write to")
            break
    return path


def check_store(location: str, flag: str, output: bool = False):
    """The :class:`hfedit.storage.Location` of a URI given to ``flag``, its store reachable and
    its bucket there (an output's prefix also not an object), checked before any work; raises
    :class:`UsageError` naming the URI and the fix."""
    from hfedit.storage import Location, StorageError

    try:
        loc = Location(location)
        loc.check_bucket()
        if output and loc.local is None and loc.is_file():
            raise UsageError(f"{flag} {location} is an object, not a prefix: give a prefix for "
                             "the outputs")
    except StorageError as err:
        raise UsageError(f"{flag} {err}") from None
    return loc


def check_stores(args, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> None:
    """:func:`check_store` for each of these flags (``--backbone``: ``args.backbone``) whose
    value is a URI; ``outputs`` are checked as output prefixes."""
    from hfedit.storage import is_uri

    for flag in (*inputs, *outputs):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and is_uri(str(value)):
            check_store(str(value), flag, output=flag in outputs)


def check_list_file(path: str | os.PathLike, flag: str = "--input") -> Path:
    """``path`` is a text file listing image paths, not an image or other binary file (paths
    that are not UTF-8 are fine: they are file names' bytes)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8192)
    kind = _image_format(path)
    if kind or b"\x00" in head:
        what = f"an image ({kind})" if kind else "not a text file"
        raise UsageError(
            f"{flag} {path} is {what}, not a folder or a list file: give a folder of images "
            "(searched recursively), a text file with one image path per line, or a prepared "
            "dataset with --split. For one image: python -m hfedit reconstruct|edit IMAGE")
    return path


def _image_format(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.format or "image"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return ""


# A URI's scheme: s3://, gs://, file://, hdfs://, ... (models:/ names of the MLflow registry have
# no "//" and are taken where a command says so). Settings given as key=value are checked only
# for the keys that name data (a tracking server or a Ray address is a URL by design).
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://\S*)")
_DATA_KEYS = ("data.source", "edit_batch.edits_dir")


def refuse_uris(argv: list[str], command: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse object-storage URIs before any work where a command reads and writes local paths
    only (pathlib would turn ``s3://b/x`` into a local folder ``s3:/b/x``); the values of the
    flags in ``allowed`` (``--input``, ``--data``, ...: those a command reads through
    :mod:`hfedit.storage`) may be URIs. Raises :class:`UsageError` naming the URI and the fix."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        key, _, value = arg.partition("=")
        if key in allowed:
            skip = not _  # "--flag value": the value is the next argument
            continue
        found = _URI.match(value if value and key.lstrip("-") in _DATA_KEYS else arg)
        if found:
            takes = f" (URIs are taken by {', '.join(allowed)})" if allowed else ""
            raise UsageError(
                f"{found.group(1)}: {command} takes local paths only{takes}; copy the data to a "
                "local or mounted folder (e.g. `aws s3 sync`, s3fs, a DVC remote with `dvc pull`) "
                "and give that path")
