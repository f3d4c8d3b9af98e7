"""Batch editing, the worker side: the callable class Ray Data runs in each actor.

It loads the backbone and the rectifiers once per actor; per batch it decodes every image, inverts
the batch once and replays all (image, attribute) pairs in one batch (:meth:`Editor.edit`),
writes the PNGs and appends each finished image's rows to the done-log. Outputs depend on the
batch only through float rounding: the same images in the same batches give identical PNGs,
other batchings agree within 1e-5 before quantisation (README, "Determinism").
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pandas as pd
import torch

from hfedit.data import ImageError, load_image, load_split, save_png, to_tensor
from hfedit.editing import RECONSTRUCTION, load_editor
from pipelines.batch_job import (COLUMNS, EDIT_FAILED, WORKER_CRASHED, DoneIndex, Job, DoneLog,
                                 is_complete, output_relpath)


# ------------------------------------------------------------------ the callable class
class EditImages:
    """Ray Data callable class (and the plain loop's function): decode -> preprocess -> invert
    the batch once -> one replay of every (image, attribute) pair -> PNGs + rows. Loads the
    backbone and rectifiers once."""

    def __init__(self, job: Job) -> None:
        torch.set_num_threads(max(1, job.torch_threads))
        self.job, self.out, self.pid = job, Path(job.out), os.getpid()
        self.device = torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")
        edits = [a for a in job.attributes if a != RECONSTRUCTION]
        self.editor = load_editor(job.backbone, job.inversion, job.edits_dir if edits else None,
                                  edits, device=self.device)
        self.done = DoneIndex(self.out)
        self.log = DoneLog(self.out, job.run)
        self._splits: dict[str, torch.Tensor] = {}
        if job.pid_dir:  # lets operators (and tests) find and signal the actors
            Path(job.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(job.pid_dir) / f"{self.pid}.pid").write_text(str(self.pid))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows, todo = [], []
        for item in batch.to_dict("records"):
            done, work = self.triage(item)
            rows += done
            if work is not None:
                todo.append(work)
        groups: dict[tuple[str, ...], list[dict]] = {}
        for work in todo:  # one inversion + one joint replay per set of pending attributes
            groups.setdefault(tuple(r["attribute"] for r in work["rows"]), []).append(work)
        for names, group in groups.items():
            rows += self.edit_group(list(names), group)
        return pd.DataFrame(rows, columns=COLUMNS)

    def triage(self, item: dict) -> tuple[list[dict], dict | None]:
        """(rows that already stand, the image's pending work: decoded ``x0`` and new rows),
        for the attributes of ``item["pending"]`` (comma-separated). A decode error or a
        worker that died too often on it ends as error rows here."""
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
            return rows, None
        new = [dict(base, attribute=a, fingerprint=self.job.fingerprints[a]) for a in todo]
        tries = self.done.refresh().attempts[(self.job.run, id_)]
        if tries >= self.job.max_attempts:  # it killed its worker each time: do not loop forever
            why = RuntimeError(f"the worker process died {tries} times while editing this image "
                               f"(edit_batch.max_attempts={self.job.max_attempts})")
            failed = [error_row(r, WORKER_CRASHED, why) for r in new]
            self.log.append(failed)
            return rows + failed, None
        self.log.append([{"attempt": id_, "run": self.job.run}])
        start = time.perf_counter()
        try:
            x0 = self._load(item)  # (1, 3, R, R) in [-1, 1]
        except Exception as err:  # noqa: BLE001 - one bad image never stops the batch
            reason = err.reason if isinstance(err, ImageError) else EDIT_FAILED
            failed = [error_row(r, reason, err, decode_s=time.perf_counter() - start) for r in new]
            self.log.append(failed)
            return rows + failed, None
        decode_s = time.perf_counter() - start
        for row in new:
            row["decode_s"] = decode_s
        return rows, {"x0": x0, "seed": seed, "id": id_, "rows": new}

    def edit_group(self, names: list[str], group: list[dict]) -> list[dict]:
        """Invert the group's B images once (one batch) and replay them for ``names`` in one
        batch of B x K (:meth:`hfedit.editing.Editor.edit`); write and log image by image. The
        seconds of the batched calls are shared out equally per image (invert) and per row."""
        x0 = torch.cat([w["x0"] for w in group])  # (B, 3, R, R)
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
            failed = [error_row(r, EDIT_FAILED, err) for r in rows]
            self.log.append(failed)
            return failed
        out = []
        for b, work in enumerate(group):
            for row in work["rows"]:
                row.update(invert_s=invert_s, edit_s=edit_s)
                row.update(self._write(x0[b:b + 1], outputs[row["attribute"]][b:b + 1],
                                       row["attribute"], work["id"]))
            self.log.append(work["rows"])  # after its PNGs: the image is done
            out += work["rows"]
        return out

    def _write(self, x0: torch.Tensor, result: torch.Tensor, attribute: str, id_: str) -> dict:
        from hfedit.metrics import l1, ssim

        try:
            if not torch.isfinite(result).all():
                raise FloatingPointError("the edit produced NaN or inf values")
            image = result.clamp(-1, 1)  # what the PNG holds, before rounding to 8 bits
            exact = attribute == RECONSTRUCTION
            metrics = {"l1": float(l1(x0, image)[0]),
                       "ssim": float(ssim(x0, image)[0]) if min(x0.shape[-2:]) >= 11 else math.nan,
                       "max_error": float((result - x0).abs().max()) if exact else math.nan}
            start = time.perf_counter()
            rel = output_relpath(attribute, id_)
            save_png(image[0].cpu(), self.out / rel)  # temporary name + rename
            return {"status": "ok", "output": rel, "write_s": time.perf_counter() - start, **metrics}
        except Exception as err:  # noqa: BLE001
            return error_row({}, EDIT_FAILED, err)

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


def error_row(row: dict, reason: str, err: Exception, **extra) -> dict:
    message = str(err) if isinstance(err, ImageError) else f"{type(err).__name__}: {err}"
    return {**row, "status": "error", "reason": reason, "message": message, "output": None, **extra}
