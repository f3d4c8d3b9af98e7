"""Batch editing, the worker side: the three Ray Data stages of an edit_batch job.

1. :func:`decode_images` (CPU tasks): each pending input decoded and preprocessed exactly as the
   prepare stage does, to a (3, R, R) float32 array; a bad input becomes its error here.
2. :class:`EditImages` (the model actor, ``num_gpus``/``num_cpus``): loads the backbone and the
   rectifiers once; per batch of ``edit_batch.batch_size`` images, one inversion and one joint
   replay of every (image, attribute) pair (:meth:`hfedit.editing.editor.Editor.edit`); arrays in, the
   edited arrays out (one row per image and attribute).
3. :func:`write_outputs` (CPU tasks): the PNGs, the metrics and the done-log rows (an image's
   rows are appended once its PNGs are in place).

Every stage takes and returns a dict of numpy arrays (Ray Data's "numpy" batch format). Outputs
depend on the batch only through float rounding: the same images in the same batches give
identical PNGs, other batchings agree within 1e-5 before quantisation (docs/batch.md#determinism).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from hfedit.data.images import ImageError, load_image, load_image_bytes, to_pil, to_tensor
from hfedit.storage import Location, is_uri, local_copy
from hfedit.data.prepared import Split, load_split
from hfedit.editing.editor import RECONSTRUCTION, load_editor
from hfedit.device import placement
from pipelines.batch_job import (COLUMNS, EDIT_FAILED, NO_SPACE, WORKER_CRASHED, DoneIndex, Job, DoneLog,
                                 from_wire, is_complete, output_relpath, to_wire)

Batch = dict  # column -> np.ndarray of length B ("numpy" batch format); arrays stacked


def records(batch: Batch) -> list[dict]:
    """The rows of a batch (array columns give one (3, R, R) array per row), file names as the
    file system has them (they cross Ray as Arrow-safe text: :func:`columns`)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [from_wire({k: v[i] for k, v in batch.items()}) for i in range(n)]


def columns(rows: list[dict], keys: list[str]) -> Batch:
    """Rows back to a batch of ``keys``; arrays are stacked, everything else is an object column;
    file names made Arrow-safe (:func:`pipelines.batch_job.to_wire`; :func:`records` undoes it)."""
    out = {}
    rows = [to_wire(r) for r in rows]
    for k in keys:
        values = [r.get(k) for r in rows]
        if values and isinstance(values[0], np.ndarray):
            out[k] = np.stack(values)
        else:
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[k] = col
    return out


def _str(value) -> str:
    return "" if value is None else str(value)


# ------------------------------------------------------------------ 1. decode (CPU tasks)
_SPLITS: dict[str, "Split"] = {}  # per worker process: prepared splits opened once, read per row


@functools.lru_cache(maxsize=8)
def backbone_resolution(backbone: str) -> int:
    """The image size R the backbone takes (its UNet config's sample_size), without loading it."""
    from diffusers import UNet2DModel

    backbone = str(local_copy(backbone)) if is_uri(backbone) else backbone
    for sub in ("unet", None):
        try:
            config = UNet2DModel.load_config(backbone, **({"subfolder": sub} if sub else {}))
        except Exception:  # noqa: BLE001 - the other layout; load_backbone reports the failure
            continue
        size = config["sample_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    raise ValueError(f"--backbone {backbone}: no UNet2DModel config found")


def decode_images(batch: Batch, job: Job, size: int) -> Batch:
    """Pending inputs -> one row each: ``x0`` (3, R, R) float32 in [-1, 1] and ``decode_s``, or
    (zeros and) the ``reason`` and ``message`` of a bad input."""
    rows = []
    for item in records(batch):
        row = {k: item[k] for k in ("id", "input", "signature", "pending", "name")}
        row.update(seed=int(item["seed"]), reason="", message="", integrity="")
        start = time.perf_counter()
        try:
            x0, row["integrity"] = _decode(item, job, size)
        except Exception as err:  # noqa: BLE001 - one bad image never stops the batch
            row.update(reason=err.reason if isinstance(err, ImageError) else EDIT_FAILED,
                       message=str(err) if isinstance(err, ImageError) else f"{type(err).__name__}: {err}")
            x0 = torch.zeros(3, size, size)
        row.update(x0=x0.numpy(), decode_s=time.perf_counter() - start)
        rows.append(row)
    return columns(rows, ["id", "input", "signature", "pending", "name", "seed", "reason",
                          "message", "integrity", "decode_s", "x0"])


def _decode(item: dict, job: Job, size: int) -> tuple[torch.Tensor, str]:
    """Decode + preprocess exactly as the prepare stage does (or read a prepared split): the
    image and its ``integrity`` (:data:`hfedit.data.images.INTEGRITY`; ``prepared``: the prepare
    stage's manifest says it)."""
    if int(item["index"]) >= 0:
        path = str(item["input"]).rsplit("#", 1)[0]
        if path not in _SPLITS:
            _SPLITS[path] = load_split(Path(path).parent, Path(path).stem)
        x0 = _SPLITS[path][int(item["index"])]
        if x0.shape[-1] != size:
            raise ValueError(f"{path} holds {x0.shape[-1]} px images; the backbone expects "
                             f"{size} px: rerun prepare with data.resolution={size}")
        return x0, "prepared"
    if is_uri(str(item["input"])):  # an object on a store: decoded from its bytes
        try:
            data = Location(str(item["input"])).read_bytes()
        except FileNotFoundError:
            raise ImageError("not_a_file", item["input"], "no such object on the store") from None
        loaded = load_image_bytes(data, str(item["input"]), job.max_pixels,
                                  require_verified=job.require_verified)
    else:
        loaded = load_image(str(item["input"]), job.max_pixels, job.root or None,
                            require_verified=job.require_verified)
    return to_tensor(loaded.image, size, job.center_crop), loaded.integrity


# ------------------------------------------------------------------- 2. the model actor
OUT = [*COLUMNS, "name", "source", "edited", "write", "logged", "worker_node"]


class EditImages:
    """Ray Data callable class (and the plain loop's model): decoded images -> one inversion of
    the batch -> one replay of every (image, attribute) pair -> edited arrays, one row per
    (image, attribute) (``write``: the writer still has to save it; ``logged``: the row is in
    the done-log already). Loads the backbone and rectifiers once."""

    def __init__(self, job: Job) -> None:
        torch.set_num_threads(max(1, job.torch_threads))
        self.job, self.out, self.pid, self.node = job, Location(job.out), os.getpid(), _node()
        self.device, precision = placement(job.device, job.precision, "editing")
        edits = [a for a in job.attributes if a != RECONSTRUCTION]
        # models on a store: fetched into this node's cache (every node its own copy)
        backbone = str(local_copy(job.backbone)) if is_uri(job.backbone) else job.backbone
        edits_dir = (local_copy(job.edits_dir) if is_uri(job.edits_dir) else job.edits_dir) \
            if edits else None
        self.editor = load_editor(backbone, job.inversion, edits_dir, edits, device=self.device)
        self.editor.denoiser.precision = precision
        self.done = DoneIndex(self.out)
        self.log = DoneLog(self.out, job.run)
        if job.pid_dir:  # lets operators (and tests) find and signal the actors
            Path(job.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(job.pid_dir) / f"{self.pid}.pid").write_text(str(self.pid))

    def __call__(self, batch: Batch) -> Batch:
        rows, groups = [], {}
        for item in records(batch):
            done, work = self.triage(item)
            rows += done
            if work is not None:  # one inversion + one joint replay per set of pending attributes
                groups.setdefault(tuple(r["attribute"] for r in work["rows"]), []).append(work)
        for names, group in groups.items():
            rows += self.edit_group(list(names), group)
        return columns(rows, OUT)

    def triage(self, item: dict) -> tuple[list[dict], dict | None]:
        """(rows that are final: logged before, a bad input, a worker that died too often on
        the image; the image's pending work), for the attributes of ``item["pending"]``."""
        id_, seed, x0 = _str(item["id"]), int(item["seed"]), item["x0"]
        name = _str(item["name"])
        base = {"id": id_, "input": _str(item["input"]), "seed": seed, "name": name,
                "signature": _str(item["signature"]), "run": self.job.run, "worker_pid": self.pid,
                "worker_node": self.node,
                "decode_s": float(item["decode_s"]), "integrity": _str(item.get("integrity")),
                "source": x0, "edited": x0,
                "write": False, "logged": False}
        rows, todo = [], []
        for a in _str(item["pending"]).split(","):
            if _exists(self.out, output_relpath(a, name)):  # a retried batch: logged before?
                row = self.done.refresh().rows.get((id_, a))
                if is_complete(row, base["signature"], self.job.fingerprints[a], self.out):
                    rows.append({**base, **row, "logged": True})
                    continue
            todo.append(a)
        new = [dict(base, attribute=a, fingerprint=self.job.fingerprints[a]) for a in todo]
        if not new:
            return rows, None
        if item["reason"]:  # the decode task refused it: the job's rows say why
            return rows + [{**r, "status": "error", "reason": _str(item["reason"]),
                            "message": _str(item["message"]), "output": None} for r in new], None
        tries = self.done.refresh().attempts[(self.job.run, id_)]
        if tries >= self.job.max_attempts:  # it killed its worker each time: do not loop forever
            why = RuntimeError(f"the worker process died {tries} times while editing this image "
                               f"(edit_batch.max_attempts={self.job.max_attempts})")
            failed = [{**error_row(r, WORKER_CRASHED, why), "logged": True} for r in new]
            self.log.append([_logged(r) for r in failed])
            return rows + failed, None
        self.log.append([{"attempt": id_, "run": self.job.run}])
        return rows, {"x0": torch.from_numpy(np.array(x0)), "seed": seed, "rows": new}

    def edit_group(self, names: list[str], group: list[dict]) -> list[dict]:
        """Invert the group's B images once and replay them for ``names`` in one batch of B x K
        (:meth:`hfedit.editing.editor.Editor.edit`). The seconds of the batched calls are shared out
        equally per image (invert) and per row (edit)."""
        x0 = torch.stack([w["x0"] for w in group]).to(self.device)  # (B, 3, R, R)
        seeds = [w["seed"] for w in group]
        rows = [r for w in group for r in w["rows"]]
        try:
            start = time.perf_counter()
            inv = self.editor.invert(x0, seeds)
            invert_s = (time.perf_counter() - start) / len(group)
            start = time.perf_counter()
            outputs = self.editor.edit(x0, seeds, names, inversion=inv).outputs
            edit_s = (time.perf_counter() - start) / len(rows)
        except Exception as err:  # noqa: BLE001 - the batch's rows say why; the job goes on
            return [error_row(r, EDIT_FAILED, err) for r in rows]
        for b, work in enumerate(group):
            for row in work["rows"]:
                edited = outputs[row["attribute"]][b].float().cpu().numpy()  # (3, R, R)
                row.update(invert_s=invert_s, edit_s=edit_s, edited=edited, write=True)
        return rows


# ------------------------------------------------------------------ 3. write (CPU tasks)
_LOGS: dict[tuple[str, str], DoneLog] = {}  # per worker process and job


def write_outputs(batch: Batch, job: Job) -> Batch:
    """Edited arrays -> PNGs (temporary name + rename) and metrics; then each image's rows are
    appended to the done-log (one write) unless they are there already. Returns the manifest
    rows (``COLUMNS``)."""
    out = Location(job.out)
    log = _LOGS.setdefault((job.out, job.run), DoneLog(out, job.run))
    rows = records(batch)
    for row in rows:
        if row["write"]:
            row.update(_write(row["source"], row["edited"], _str(row["attribute"]),
                              _str(row["name"]), out))
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(_str(row["id"]), []).append(row)
    for image_rows in by_image.values():  # after its PNGs: the image is done
        fresh = [_logged(r) for r in image_rows if not r["logged"]]
        if fresh:
            log.append(fresh)
    return columns([{c: _plain(r.get(c)) for c in COLUMNS} for r in rows], COLUMNS)


def _exists(out: Location, rel: str) -> bool:
    return (out.local / rel).exists() if out.local is not None else out.size(rel) is not None


def _write(source: np.ndarray, edited: np.ndarray, attribute: str, name: str, out: Location) -> dict:
    from hfedit.evaluation.metrics import l1, ssim

    try:
        result = torch.from_numpy(np.array(edited))[None]  # (1, 3, R, R)
        x0 = torch.from_numpy(np.array(source))[None]
        if not torch.isfinite(result).all():
            raise FloatingPointError("the edit produced NaN or inf values")
        image = result.clamp(-1, 1)  # what the PNG holds, before rounding to 8 bits
        exact = attribute == RECONSTRUCTION
        metrics = {"l1": float(l1(x0, image)[0]),
                   "ssim": float(ssim(x0, image)[0]) if min(x0.shape[-2:]) >= 11 else math.nan,
                   "max_error": float((result - x0).abs().max()) if exact else math.nan}
        start = time.perf_counter()
        rel = output_relpath(attribute, name)
        buf = io.BytesIO()
        to_pil(image[0]).save(buf, format="PNG")
        data = buf.getvalue()
        out.write_bytes(rel, data)  # temporary, fsync, rename (or one PUT): before its done entry
        return {"status": "ok", "output": rel, "write_s": time.perf_counter() - start, **metrics,
                "out_bytes": len(data), "out_sha256": hashlib.sha256(data).hexdigest(),
                "written_on": _node()}
    except Exception as err:  # noqa: BLE001
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        return error_row({}, NO_SPACE if full else EDIT_FAILED, err)


# done-log only: the PNG as written (resume verifies it), and the Ray nodes of the process that
# edited it and of the one that wrote it (its disk holds the file)
CHECKED = ("out_bytes", "out_sha256", "worker_node", "written_on")


def _node() -> str:
    """This process's Ray node id ("" outside Ray: the plain loop)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _plain(value):
    """numpy scalars -> Python (JSON, pandas)."""
    return value.item() if isinstance(value, np.generic) else value


def _logged(row: dict) -> dict:
    return {c: _plain(row.get(c)) for c in (*COLUMNS, *CHECKED) if row.get(c) is not None}


def error_row(row: dict, reason: str, err: Exception, **extra) -> dict:
    message = str(err) if isinstance(err, ImageError) else f"{type(err).__name__}: {err}"
    return {**row, "status": "error", "reason": reason, "message": message, "output": None, **extra}
