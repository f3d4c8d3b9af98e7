"""Batch inversion + editing of many images on Ray Data.

    python pipelines/edit_batch.py --input photos/ --out outputs/photos \
        [--attributes reconstruction smiling] [--actors 2 --batch-size 4 --num-gpus 0]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/edit_batch.py --input /abs/photos --out /abs/outputs/photos ...
    dvc repro edit_batch    # the val split: --input data/prepared --split val --out outputs/val

Inputs: a folder (searched recursively), a list file (one path per line, relative to ``--root``,
default the list file's folder) or a prepared split. The driver only lists files; each image is
decoded and preprocessed inside Ray Data with the prepare stage's code (``load_image`` +
``to_tensor``), inverted once and replayed per attribute by :class:`EditImages`, a callable class
that loads the backbone and the rectifiers once per actor.

Outputs: ``<out>/<attribute>/<id>.png`` (``id``: the path relative to the input folder; written
to a temporary name and renamed, so no partial PNG ever appears) and ``<out>/manifest.parquet``,
one row per (input, attribute): input, output, seed, timings, L1/SSIM to the source (and the max
error of ``reconstruction``), or the reason it failed. Every input gets its rows.

Determinism: image ``id``'s noise comes from seed sha256(f"{inversion.seed}:{id}") and each image
is processed alone (batched CPU kernels are not bit-invariant), so results do not depend on
actors, batch size or scheduling.

Resume: as soon as an image's PNGs are in place its rows are appended (one write, fsync) to
``<out>/_log/<run>-<pid>-*.jsonl``. A rerun skips every (input, attribute) whose logged row matches
the job's fingerprint (backbone, rectifier, inversion and preprocessing settings) and the input
file's size and mtime, and whose PNG exists; an actor retrying a batch after a crash skips the
images already logged. Ray Data restarts a dead actor and retries its batch; an image on which
workers died ``edit_batch.max_attempts`` times becomes a ``worker_crashed`` row instead of
killing workers forever.

Exit status: 0 every input edited; 3 the job finished and some inputs failed (reasons in the
manifest; ``--allow-failed`` makes that 0); 2 bad arguments or configuration (nothing done); 1
the job itself failed and 130 interrupted (both after writing the manifest of what was done).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional

import pandas as pd
import torch

from hfedit.checkpoint import atomic_write_bytes, atomic_write_json, file_digest, fingerprint
from hfedit.config import ConfigError, HfeditConfig, InversionConfig, load_config, to_flat_dict
from hfedit.data import (SPLITS, ImageError, iter_folder, load_image, load_manifest, load_split,
                         save_png, to_tensor)
from hfedit.editing import RECONSTRUCTION, available_edits, load_editor

EXIT_OK, EXIT_CRASHED, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
MANIFEST, LOG_DIR, COMPACTED = "manifest.parquet", "_log", "0-compacted.jsonl"
EDIT_FAILED = "edit_failed"  # the image decoded but inversion/edit/writing raised
NOT_PROCESSED = "not_processed"  # the job stopped (crash, interrupt) before reaching it
WORKER_CRASHED = "worker_crashed"  # its worker process died edit_batch.max_attempts times on it
RETRIED = {"unreadable", EDIT_FAILED, NOT_PROCESSED, WORKER_CRASHED}  # a rerun tries these again
FORMAT = 1  # bump when the meaning of the outputs changes: every fingerprint changes with it
COLUMNS = ["id", "attribute", "status", "reason", "message", "input", "output", "seed", "l1", "ssim",
           "max_error", "decode_s", "invert_s", "edit_s", "write_s", "run", "worker_pid",
           "fingerprint", "signature"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UsageError(ValueError):
    """Bad arguments or configuration, found before any work (exit status 2)."""


# ------------------------------------------------------------------------------ inputs
@dataclass
class Entry:
    """One input. ``id``: POSIX path relative to the root (or the prepared id); ``input``: the
    file (``<split>.safetensors#<index>`` for a prepared split); ``signature``: size and mtime,
    which change when the file does; ``error``: set when it must not be opened."""

    id: str
    input: str
    signature: str = ""
    index: int = -1
    error: Optional[ImageError] = None


def _signature(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def list_inputs(source: str | os.PathLike, split: Optional[str] = None,
                root: Optional[str | os.PathLike] = None) -> list[Entry]:
    """Every input of a folder (recursive, :func:`hfedit.data.iter_folder`), a list file, or the
    ``split`` of a prepared dataset folder, sorted by id, duplicates dropped."""
    source = Path(source).absolute()
    if split is not None:
        entries = _split_entries(source, split)
    elif source.is_dir():
        entries = [Entry(e.id, str(e.path), _signature(e.path), error=e.error)
                   for e in iter_folder(source)]
    elif source.is_file():
        entries = _listed_entries(source, Path(root) if root else source.parent)
    else:
        raise UsageError(f"--input {source}: no such folder or list file")
    unique: dict[str, Entry] = {}
    for entry in entries:
        unique.setdefault(entry.id, entry)
    return sorted(unique.values(), key=lambda e: e.id)


def _split_entries(folder: Path, split: str) -> list[Entry]:
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {SPLITS}")
    try:
        manifest = load_manifest(folder)
    except FileNotFoundError as err:
        raise UsageError(f"--input {folder} --split {split}: {err}") from None
    path = folder / f"{split}.safetensors"
    sig = _signature(path)
    return [Entry(r.id, f"{path}#{r.index}", sig, index=r.index)
            for r in manifest.rows if r.split == split]


def _listed_entries(list_file: Path, root: Path) -> list[Entry]:
    """One entry per non-empty, non-# line; paths leaving ``root`` (lexically or by a link),
    missing files, folders and special files get their reason, as in :func:`iter_folder`."""
    root_abs = Path(os.path.normpath(root.absolute()))
    real_root = root.resolve()
    entries = []
    for line in list_file.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(os.path.normpath((root_abs / text).absolute()))
        try:
            id_ = path.relative_to(root_abs).as_posix()
        except ValueError:
            entries.append(Entry(text, str(path), error=ImageError(
                "outside_root", path, f"listed path is outside the root {root_abs} (set --root)")))
            continue
        real, error = path.resolve(), None
        if not real.is_relative_to(real_root):
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


def image_seed(global_seed: int, id_: str) -> int:
    """The noise seed of image ``id_``: a function of its id alone, never of the scheduling."""
    return int.from_bytes(hashlib.sha256(f"{global_seed}:{id_}".encode()).digest()[:8], "big") >> 1


def output_relpath(attribute: str, id_: str) -> str:
    """``<attribute>/<id>.png``: the id with ``.png`` appended (a.jpg and a.png stay apart)."""
    parts = PurePosixPath(id_).parts
    if not parts or PurePosixPath(id_).is_absolute() or ".." in parts:
        raise ValueError(f"image id {id_!r} is not a relative path inside the input")
    return f"{attribute}/{id_}.png"


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
    use_gpu: bool = False
    pid_dir: str = ""
    max_attempts: int = 2


def _tree_digest(path: str | os.PathLike) -> str:
    """Digest of every file under a local folder (or of the string: a hub id)."""
    path = Path(path)
    if not path.exists():
        return f"id:{path}"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return fingerprint([(p.relative_to(path).as_posix() if path.is_dir() else p.name, file_digest(p))
                        for p in files])


def check_attributes(attributes: list[str], edits_dir: str | os.PathLike) -> dict[str, str]:
    """attribute -> rectifier folder ("" for reconstruction); fails fast naming the attribute
    and the folder when an edit rectifier is missing."""
    if not attributes:
        raise UsageError("no attributes requested (--attributes / edit_batch.attributes)")
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


def make_job(cfg: HfeditConfig, backbone: str, out: Path, rectifiers: dict[str, str],
             split_input: bool, pid_dir: str = "") -> Job:
    eb, inv = cfg.edit_batch, cfg.inversion
    local = Path(backbone)
    if not local.exists() and (backbone.startswith((".", "/")) or backbone.count("/") != 1):
        raise UsageError(f"--backbone {backbone}: no such folder (the backbone stage writes "
                         "models/backbone) and not a hub id 'owner/name'")
    common = {"format": FORMAT, "backbone": _tree_digest(backbone),
              "inversion": to_flat_dict(inv),
              "preprocess": "prepared" if split_input else [cfg.data.max_pixels, cfg.data.center_crop]}
    prints = {a: fingerprint({**common, "attribute": a, "rectifier": _tree_digest(f) if f else None})
              for a, f in rectifiers.items()}
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    return Job(str(local.resolve()) if local.exists() else backbone, str(out.resolve()), run,
               list(rectifiers), str(Path(eb.edits_dir).resolve()), prints, inv,
               cfg.data.max_pixels, cfg.data.center_crop, eb.torch_threads, eb.num_gpus > 0,
               str(Path(pid_dir).absolute()) if pid_dir else "", eb.max_attempts)


# ------------------------------------------------------------------------ done log
class DoneIndex:
    """What ``<out>/_log/*.jsonl`` says: ``rows``, latest per (id, attribute), and ``attempts``
    per (run, id) (how often a worker started on the image). Read incrementally; a line torn by a
    killed process is ignored."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.folder = Path(out) / LOG_DIR
        self.rows: dict[tuple[str, str], dict] = {}
        self.attempts: Counter[tuple[str, str]] = Counter()
        self._offsets: dict[str, int] = {}

    def refresh(self) -> "DoneIndex":
        for path in sorted(self.folder.glob("*.jsonl")):
            start = self._offsets.get(path.name, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                try:
                    row = json.loads(line)
                    if "attempt" in row:
                        self.attempts[(row["run"], row["attempt"])] += 1
                    else:
                        self.rows[(row["id"], row["attribute"])] = row
                except (ValueError, KeyError, TypeError):
                    continue
            self._offsets[path.name] = start + end
        return self


def is_complete(row: Optional[dict], signature: str, fingerprint_: str, out: Path) -> bool:
    """Whether a logged row still stands: same input file, same job, PNG present (for errors:
    a failure a rerun would repeat)."""
    if row is None or row.get("signature") != signature or row.get("fingerprint") != fingerprint_:
        return False
    if row["status"] == "ok":
        return (out / row["output"]).is_file()
    return row.get("reason") not in RETRIED


class _Log:
    """This process's append-only log: one line per row, one write + fsync per image."""

    def __init__(self, out: Path, run: str) -> None:
        self.path = out / LOG_DIR / f"{run}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self._file = None

    def append(self, rows: list[dict]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write("".join(json.dumps(r, default=float) + "\n" for r in rows))  # one write
        self._file.flush()
        os.fsync(self._file.fileno())


# ------------------------------------------------------------------ the callable class
class EditImages:
    """Ray Data callable class (and the plain loop's function): decode -> preprocess -> invert
    once -> replay per attribute -> PNGs + rows. Loads the backbone and rectifiers once."""

    def __init__(self, job: Job) -> None:
        torch.set_num_threads(max(1, job.torch_threads))
        self.job, self.out, self.pid = job, Path(job.out), os.getpid()
        self.device = torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")
        edits = [a for a in job.attributes if a != RECONSTRUCTION]
        self.editor = load_editor(job.backbone, job.inversion, job.edits_dir if edits else None,
                                  edits, device=self.device)
        self.done = DoneIndex(self.out)
        self.log = _Log(self.out, job.run)
        self._splits: dict[str, torch.Tensor] = {}
        if job.pid_dir:  # lets operators (and tests) find and signal the actors
            Path(job.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(job.pid_dir) / f"{self.pid}.pid").write_text(str(self.pid))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [row for item in batch.to_dict("records") for row in self.process(item)]
        return pd.DataFrame(rows, columns=COLUMNS)

    def process(self, item: dict) -> list[dict]:
        """Rows of one image for its pending attributes (``item["pending"]``, comma-separated)."""
        id_, seed = item["id"], int(item["seed"])
        base = {"id": id_, "input": item["input"], "seed": seed, "signature": item["signature"],
                "run": self.job.run, "worker_pid": self.pid}
        rows, todo = [], []
        for a in item["pending"].split(","):
            if (self.out / output_relpath(a, id_)).exists():  # a retried batch: logged before?
                row = self.done.refresh().rows.get((id_, a))
                if is_complete(row, item["signature"], self.job.fingerprints[a], self.out):
                    rows.append(row)
                    continue
            todo.append(a)
        if not todo:
            return rows
        new = [dict(base, attribute=a, fingerprint=self.job.fingerprints[a]) for a in todo]
        tries = self.done.refresh().attempts[(self.job.run, id_)]
        if tries >= self.job.max_attempts:  # it killed its worker each time: do not loop forever
            why = RuntimeError(f"the worker process died {tries} times while editing this image "
                               f"(edit_batch.max_attempts={self.job.max_attempts})")
            failed = [_error(r, WORKER_CRASHED, why) for r in new]
            self.log.append(failed)
            return rows + failed
        self.log.append([{"attempt": id_, "run": self.job.run}])
        start = time.perf_counter()
        try:
            x0 = self._load(item)  # (1, 3, R, R) in [-1, 1]
            decode_s = time.perf_counter() - start
            start = time.perf_counter()
            inv = self.editor.invert(x0, [seed])
            invert_s = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - one bad image never stops the batch
            reason = err.reason if isinstance(err, ImageError) else EDIT_FAILED
            failed = [_error(r, reason, err, decode_s=time.perf_counter() - start) for r in new]
            self.log.append(failed)
            return rows + failed
        for row in new:
            row.update(decode_s=decode_s, invert_s=invert_s)
            row.update(self._edit(x0, seed, inv, row["attribute"], id_))
        self.log.append(new)
        return rows + new

    def _edit(self, x0: torch.Tensor, seed: int, inv, attribute: str, id_: str) -> dict:
        from hfedit.metrics import l1, ssim

        try:
            start = time.perf_counter()
            result = self.editor.edit(x0, [seed], [attribute], inversion=inv).outputs[attribute]
            if not torch.isfinite(result).all():
                raise FloatingPointError("the edit produced NaN or inf values")
            edit_s = time.perf_counter() - start
            image = result.clamp(-1, 1)  # what the PNG holds, before rounding to 8 bits
            exact = attribute == RECONSTRUCTION
            metrics = {"l1": float(l1(x0, image)[0]),
                       "ssim": float(ssim(x0, image)[0]) if min(x0.shape[-2:]) >= 11 else math.nan,
                       "max_error": float((result - x0).abs().max()) if exact else math.nan}
            start = time.perf_counter()
            rel = output_relpath(attribute, id_)
            save_png(image[0].cpu(), self.out / rel)  # temporary name + rename
            return {"status": "ok", "output": rel, "edit_s": edit_s,
                    "write_s": time.perf_counter() - start, **metrics}
        except Exception as err:  # noqa: BLE001
            return _error({}, EDIT_FAILED, err)

    def _load(self, item: dict) -> torch.Tensor:
        """Decode + preprocess exactly as the prepare stage does (or read a prepared split)."""
        size = self.editor.denoiser.sample_size
        if int(item["index"]) >= 0:
            path = item["input"].rsplit("#", 1)[0]
            if path not in self._splits:
                self._splits[path] = load_split(Path(path).parent, Path(path).stem)
            x0 = self._splits[path][int(item["index"])][None]
            if x0.shape[-1] != size:
                raise ValueError(f"{path} holds {x0.shape[-1]} px images; the backbone expects "
                                 f"{size} px: rerun prepare with data.resolution={size}")
        else:
            loaded = load_image(item["input"], self.job.max_pixels)
            x0 = to_tensor(loaded.image, size, self.job.center_crop)[None]
        return x0.to(self.device)


def _error(row: dict, reason: str, err: Exception, **extra) -> dict:
    message = str(err) if isinstance(err, ImageError) else f"{type(err).__name__}: {err}"
    return {**row, "status": "error", "reason": reason, "message": message, "output": None, **extra}


# ------------------------------------------------------------------------- the driver
@dataclass
class JobResult:
    manifest: pd.DataFrame  # one row per (input, attribute)
    counts: dict
    exit_code: int
    run: str
    seconds: float
    table: str = ""
    summary: str = ""
    error: str = ""


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One job at a time per output folder (resume and cleanup assume it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".edit_batch.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another edit_batch job is writing to {out}") from None
        _remove_temporaries(out)
        yield


def _remove_temporaries(out: Path) -> None:
    """Temporary files of writers killed before their rename (never a finished PNG)."""
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def plan(entries: list[Entry], job: Job, done: DoneIndex, global_seed: int
         ) -> tuple[list[dict], list[dict]]:
    """Split the work: (items for Ray Data, each with its pending attributes; rows that already
    stand: logged before, or inputs refused while listing)."""
    out = Path(job.out)
    items, rows = [], []
    for e in entries:
        seed = image_seed(global_seed, e.id)
        if e.error is not None:
            rows += [_error({"id": e.id, "attribute": a, "input": e.input, "seed": seed,
                             "run": job.run, "signature": e.signature,
                             "fingerprint": job.fingerprints[a]}, e.error.reason, e.error)
                     for a in job.attributes]
            continue
        pending = []
        for a in job.attributes:
            row = done.rows.get((e.id, a))
            if is_complete(row, e.signature, job.fingerprints[a], out):
                rows.append(row)
            else:
                pending.append(a)
        if pending:
            items.append({"id": e.id, "input": e.input, "signature": e.signature, "index": e.index,
                          "seed": seed, "pending": ",".join(pending)})
    return items, rows


def execute(items: list[dict], job: Job, cfg: HfeditConfig, on_batch: Callable[[pd.DataFrame], None],
            progress: bool = True) -> None:
    """Run :class:`EditImages` over ``items`` on Ray Data (Ray must be initialised)."""
    import ray

    eb = cfg.edit_batch
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    n_blocks = max(1, math.ceil(len(items) / eb.batch_size))
    gpu = {"num_gpus": eb.num_gpus} if eb.num_gpus > 0 else {}
    ds = ray.data.from_items(items, override_num_blocks=n_blocks).map_batches(
        EditImages,
        fn_constructor_kwargs={"job": job},
        batch_size=eb.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(eb.actors, n_blocks))),
        num_cpus=eb.num_cpus,
        **gpu,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        on_batch(batch)


def execute_plain(items: list[dict], job: Job, cfg: HfeditConfig,
                  on_batch: Callable[[pd.DataFrame], None], progress: bool = True) -> None:
    """The same callable class in a plain loop in this process (no Ray): the benchmark's
    baseline, and a way to debug one image."""
    fn = EditImages(job)
    size = cfg.edit_batch.batch_size
    for start in range(0, len(items), size):
        on_batch(fn(pd.DataFrame(items[start:start + size])))


Executor = Callable[[list[dict], Job, HfeditConfig, Callable[[pd.DataFrame], None], bool], None]


def _check_resources(cfg: HfeditConfig) -> None:
    import ray

    eb, have = cfg.edit_batch, ray.cluster_resources()
    if eb.actors < 1 or eb.batch_size < 1 or eb.num_cpus <= 0:
        raise UsageError(f"edit_batch.actors={eb.actors}, batch_size={eb.batch_size} and "
                         f"num_cpus={eb.num_cpus} must be positive")
    for key, per in (("CPU", eb.num_cpus), ("GPU", eb.num_gpus)):
        if eb.actors * per > have.get(key, 0) + 1e-9:
            raise UsageError(f"edit_batch.actors={eb.actors} x num_{key.lower()}s={per} needs "
                             f"{eb.actors * per:g} {key}s; the Ray cluster has {have.get(key, 0):g}: "
                             "lower --actors or the per-actor resources")


def run_job(cfg: HfeditConfig, source: str | os.PathLike, out: str | os.PathLike,
            backbone: str = "models/backbone", split: Optional[str] = None,
            root: Optional[str] = None, pid_dir: str = "", progress: bool = True,
            start_ray: Callable[[], None] = lambda: None, executor: Executor = execute) -> JobResult:
    """List, skip what is done, edit the rest on Ray Data (``executor``), write the manifest.
    ``start_ray`` is called only when there is work: a rerun with nothing left never starts Ray."""
    out = Path(out)
    rectifiers = check_attributes(cfg.edit_batch.attributes, cfg.edit_batch.edits_dir)
    real_out = out.resolve()  # an output folder inside the input folder is not input
    entries = [e for e in list_inputs(source, split, root)
               if split is not None or not Path(e.input).resolve().is_relative_to(real_out)]
    if not entries:
        raise UsageError(f"--input {source}: no files")
    job = make_job(cfg, backbone, out, rectifiers, split is not None, pid_dir)
    with _locked(out):
        done = DoneIndex(out).refresh()
        items, standing = plan(entries, job, done, cfg.inversion.seed)
        got: list[pd.DataFrame] = []
        error, code, started = "", EXIT_OK, time.perf_counter()
        if items:
            if executor is execute:
                start_ray()
                _check_resources(cfg)
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), unit="img", desc="edit_batch", disable=not progress)

            def on_batch(batch: pd.DataFrame) -> None:
                got.append(batch)
                bar.update(batch["id"].nunique())

            try:
                executor(items, job, cfg, on_batch, progress)
            except KeyboardInterrupt:
                error, code = "interrupted", EXIT_INTERRUPTED
            except Exception as err:  # noqa: BLE001 - still account for every input
                error, code = f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}", EXIT_CRASHED
            finally:
                bar.close()
        seconds = time.perf_counter() - started
        _write_manifest(_assemble(entries, job, standing, got, done.refresh(), error), out)
        manifest = read_manifest(out)  # what the user gets, typed as the file is
        if not error:  # after a crash actors may still be writing: the next run tidies up
            _compact_logs(out, done)
            _remove_temporaries(out)
    counts = count(manifest, job.run, len(items))
    if code == EXIT_OK and counts["failed"]:
        code = EXIT_FAILED
    result = JobResult(manifest, counts, code, job.run, seconds, error=error)
    result.table, result.summary = summary_table(manifest, job.run), summary_line(result, out)
    return result


def _assemble(entries: list[Entry], job: Job, standing: list[dict], got: list[pd.DataFrame],
              done: DoneIndex, error: str) -> pd.DataFrame:
    """Exactly one row per (input, attribute): this run's result, else the logged one (an
    actor's work whose batch never came back), else the standing one, else not_processed."""
    rows = {(r["id"], r["attribute"]): r for r in standing}
    for (key, row) in done.rows.items():
        if row.get("run") == job.run:
            rows[key] = row
    for batch in got:
        for row in batch.to_dict("records"):
            rows[(row["id"], row["attribute"])] = row
    out = []
    for e in entries:
        for a in job.attributes:
            row = rows.get((e.id, a))
            if row is None:
                why = RuntimeError(error or "the job ended before this image was processed")
                row = _error({"id": e.id, "attribute": a, "input": e.input, "run": job.run,
                              "seed": image_seed(job.inversion.seed, e.id), "signature": e.signature,
                              "fingerprint": job.fingerprints[a]}, NOT_PROCESSED, why)
            out.append({c: row.get(c) for c in COLUMNS})
    df = pd.DataFrame(out, columns=COLUMNS)
    for col in ("l1", "ssim", "max_error", "decode_s", "invert_s", "edit_s", "write_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("reason", "message", "output"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    df["seed"] = df["seed"].astype("int64")
    df["worker_pid"] = pd.to_numeric(df["worker_pid"], errors="coerce").astype("Int64")
    return df


def _write_manifest(df: pd.DataFrame, out: Path) -> Path:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / MANIFEST, buf.getvalue())
    return out / MANIFEST


def read_manifest(out: str | os.PathLike) -> pd.DataFrame:
    return pd.read_parquet(Path(out) / MANIFEST)


def _compact_logs(out: Path, done: DoneIndex) -> None:
    """Replace the per-process logs by one file of the rows that stand (bounded growth)."""
    keep = [r for r in done.refresh().rows.values()
            if r["status"] == "ok" or r.get("reason") not in RETRIED]
    text = "".join(json.dumps(r, default=float) + "\n" for r in keep)
    atomic_write_bytes(done.folder / COMPACTED, text.encode())
    for path in done.folder.glob("*.jsonl"):
        if path.name != COMPACTED:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- summary
def count(df: pd.DataFrame, run: str, scheduled: int) -> dict:
    """Counts per input (an input is edited when all its attributes are)."""
    per = df.groupby("id", sort=False).agg(ok=("status", lambda s: bool((s == "ok").all())),
                                           now=("run", lambda r: bool((r == run).any())))
    reasons = (df[df.status == "error"].groupby("id")["reason"].first().value_counts())
    return {"inputs": int(len(per)), "edited": int(per.ok.sum()),
            "edited_now": int((per.ok & per.now).sum()), "edited_before": int((per.ok & ~per.now).sum()),
            "failed": int((~per.ok).sum()), "scheduled": scheduled,
            "reasons": {str(k): int(v) for k, v in sorted(reasons.items())}}


def summary_table(df: pd.DataFrame, run: str) -> str:
    head = f"{'attribute':<16}{'edited':>7}{'now':>6}{'before':>7}{'failed':>7}{'L1':>9}{'SSIM':>8}" \
           f"{'max err':>10}{'edit s/img':>11}"
    lines = [head, "-" * len(head)]
    for attr, g in df.groupby("attribute", sort=True):
        ok = g[g.status == "ok"]
        now = ok[ok.run == run]
        max_err = f"{ok.max_error.max():.1e}" if ok.max_error.notna().any() else "-"
        lines.append(f"{attr:<16}{len(ok):>7}{len(now):>6}{len(ok) - len(now):>7}{len(g) - len(ok):>7}"
                     f"{ok.l1.mean():>9.4f}{ok.ssim.mean():>8.4f}{max_err:>10}"
                     f"{now.edit_s.mean() if len(now) else float('nan'):>11.3f}")
    bad = df[df.status == "error"].groupby("reason")["id"].nunique()
    if len(bad):
        lines.append("failed inputs by reason: " + ", ".join(f"{r} {n}" for r, n in bad.items()))
    return "\n".join(lines)


def summary_line(result: JobResult, out: Path) -> str:
    c = result.counts
    rate = c["edited_now"] / result.seconds if result.seconds > 0 and c["edited_now"] else 0.0
    reasons = ", ".join(f"{k} {v}" for k, v in c["reasons"].items())
    return (f"edit_batch: {c['inputs']} inputs, {c['edited']} edited ({c['edited_now']} now, "
            f"{c['edited_before']} before), {c['failed']} failed" + (f" ({reasons})" if reasons else "")
            + f"; {result.seconds:.1f} s, {rate:.2f} images/s; manifest {out / MANIFEST}"
            + (f"; stopped: {result.error}" if result.error else ""))


def metrics_dict(result: JobResult) -> dict:
    ok = result.manifest[result.manifest.status == "ok"]
    per_attr = {a: {"l1": float(g.l1.mean()), "ssim": float(g.ssim.mean()),
                    **({"max_error": float(g.max_error.max())} if a == RECONSTRUCTION else {})}
                for a, g in ok.groupby("attribute")}
    return {**result.counts, "seconds": result.seconds, "attributes": per_attr}


# ------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True,
                   help="folder (recursive), list file, or prepared dataset (with --split)")
    p.add_argument("--out", required=True, type=Path,
                   help="<out>/<attribute>/<id>.png + manifest.parquet")
    p.add_argument("--split", choices=SPLITS, help="edit this split of the prepared dataset --input")
    p.add_argument("--root", help="list file: paths are relative to, and must stay inside, this folder")
    p.add_argument("--backbone", default="models/backbone")
    p.add_argument("--attributes", nargs="+", help="reconstruction and/or edits (edit_batch.attributes)")
    p.add_argument("--edits", help="edit rectifiers <edits>/<attribute>/ (edit_batch.edits_dir)")
    p.add_argument("--actors", type=int, help="Ray Data actors (edit_batch.actors)")
    p.add_argument("--batch-size", type=int, help="images per actor call (edit_batch.batch_size)")
    p.add_argument("--num-cpus", type=float, help="CPUs per actor (edit_batch.num_cpus)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (edit_batch.num_gpus)")
    p.add_argument("--steps", type=int, help="inversion steps N (inversion.num_steps)")
    p.add_argument("--metrics", type=Path, help="also write the counts and mean metrics here (JSON)")
    p.add_argument("--pid-dir", default="", help="actors write <pid>.pid here")
    p.add_argument("--allow-failed", action="store_true",
                   help="exit 0 even when some inputs failed (they are listed in the manifest)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> HfeditConfig:
    sets = list(args.overrides)
    flags = {"edits_dir": args.edits, "actors": args.actors, "batch_size": args.batch_size,
             "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    sets += [f"edit_batch.{k}={v}" for k, v in flags.items() if v is not None]
    if args.attributes:
        sets.append(f"edit_batch.attributes=[{','.join(args.attributes)}]")
    if args.steps is not None:
        sets.append(f"inversion.num_steps={args.steps}")
    return load_config(overrides=sets)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"edit_batch: {err}", file=sys.stderr)
        return EXIT_USAGE

    def start_ray() -> None:
        from pipelines.ray_runtime import init_ray

        init_ray(cfg)

    def go() -> JobResult:
        return run_job(cfg, args.input, args.out, args.backbone, args.split, args.root,
                       args.pid_dir, not args.no_progress, start_ray)

    try:
        if args.no_track:
            result = go()
        else:
            from pipelines.tracking import stage_run

            with stage_run(cfg, "edit_batch", tags={"edit_batch.input": args.input}) as tracker:
                result = go()
                flat = {k: v for k, v in _flatten(metrics_dict(result)).items()
                        if isinstance(v, (int, float))}
                tracker.log_metrics(flat, step=0)
                tracker.log_artifact(args.out / MANIFEST)
                tracker.log_text(result.table + "\n" + result.summary + "\n", "summary.txt")
    except UsageError as err:
        print(f"edit_batch: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.metrics:
        atomic_write_json(args.metrics, metrics_dict(result))
    print(result.table)
    print(result.summary, flush=True)
    return EXIT_OK if result.exit_code == EXIT_FAILED and args.allow_failed else result.exit_code


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


if __name__ == "__main__":
    # Run as the importable module, so actors unpickle pipelines.edit_batch.EditImages by name.
    from pipelines.edit_batch import main as _main

    sys.exit(_main())
