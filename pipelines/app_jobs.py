"""The browser editor's back end (``pipelines.app`` serves it): the attributes it offers (a
models folder, MLflow's registered edit models), the front door loaded once per source, the
jobs and their one worker thread, and the cache folder every upload and result lives in.

A job's input is written into ``<cache>/jobs/<id>/input`` and decoded strictly by
:func:`hfedit.data.images.load_image` before it is queued (a refusal names the upload and the
fix); the worker edits it through :class:`hfedit.pipeline.HFEditPipeline` (the CLI's code path)
with its thread count set in the worker thread itself, counting U-Net passes with a forward hook
for the progress bar, and writes ``source.png``, ``reconstruction.png`` and ``edit.png`` beside
it. Only the newest :data:`KEEP_JOBS` finished jobs keep their files.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

RECONSTRUCTION = "reconstruction"  # hfedit.editing.editor.RECONSTRUCTION
OUTPUTS = ("source", RECONSTRUCTION, "edit")  # the PNGs of a job, by these names only
KEEP_JOBS = 32  # finished jobs whose files stay in the cache (older ones are deleted)
# hfedit.data.images.REASONS speak of a folder of files; for an upload the fix reads so
UPLOAD_FIXES = {
    "not_an_image": "upload an image file (PNG, JPEG, TIFF, WebP, ...)",
    "too_large": "downscale the image (the app refuses more pixels than data.max_pixels)",
    "empty": "the file has 0 bytes; choose the image again",
}


# ------------------------------------------------------------------------------------ sources
@dataclass
class Choice:
    """One attribute the page offers: ``id`` (what the page sends back), ``label``, and where
    its models are: a models folder, or a registered model (``uri``) fetched on first use."""

    id: str
    label: str
    attribute: str
    where: str  # the folder or the registered model's URI, as the page shows it
    folder: Optional[Path] = None
    uri: Optional[str] = None


def folder_choices(models: Path) -> list[Choice]:
    from hfedit.editing.editor import available_edits

    if not (models / "backbone").is_dir():
        return []
    return [Choice(f"folder:{a}", f"{a} (models folder)", a, str(models), folder=models)
            for a in available_edits(models / "edits")]


def registry_choices(uri: str, prefix: str) -> list[Choice]:
    """Each registered ``<prefix>-edit-<attribute>`` at its champion (else its newest) version."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}-edit-%'"):
        aliases = dict(model.aliases or {})
        if "champion" in aliases:
            version, how = str(aliases["champion"]), " @champion"
        else:
            versions = client.search_model_versions(f"name = '{model.name}'")
            if not versions:
                continue
            version, how = str(max(int(v.version) for v in versions)), ""
        attribute = model.name[len(f"{prefix}-edit-"):]
        model_uri = f"models:/{model.name}/{version}"
        out.append(Choice(f"registry:{model.name}/{version}",
                          f"{attribute} (registry: version {version}{how})", attribute,
                          f"{model_uri} in {uri}", uri=model_uri))
    return sorted(out, key=lambda c: c.label)


def store_uri(arg: str) -> str:
    """The tracking URI ``--registry`` means; a missing default SQLite store is an error (MLflow
    would create an empty one outside the cache)."""
    from hfedit.config import load_config
    from pipelines.tracking import tracking_uri

    uri = tracking_uri(load_config()) if arg == "default" else arg
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.is_file():
            raise FileNotFoundError(f"--registry: no MLflow store at {path} (run the pipeline "
                                    "with runtime.mlflow.register, or give the tracking URI)")
    return uri


# --------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One edit request: its input file in the cache, the settings, and what the page polls."""

    id: str
    folder: Path
    choice: Choice
    input: Path
    name: str  # the file name shown and used for the download (sanitised)
    num_steps: int
    skip: int
    seed: int
    state: str = "queued"  # queued | running | done | error
    passes: int = 0  # U-Net forward passes so far
    total: int = 1  # passes expected
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


class RequestError(ValueError):
    """A request the page gets back as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safe_name(name: str) -> str:
    """A file name from the browser made safe to show and to offer as a download name."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "upload").name).strip("._") or "upload"
    return base[:80]


class EditService:
    """The models, the cache folder, the queue and the one worker thread that edits."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from hfedit.config import load_config, project_root
        from hfedit.device import placement

        runtime = [f"runtime.device={args.device}"] if args.device else []
        self.cfg = load_config(overrides=[*args.overrides, *runtime])
        self.device, self.precision = placement(self.cfg.runtime.device,
                                                self.cfg.runtime.precision, "editing")
        threads = self.cfg.runtime.torch_threads if args.threads is None else args.threads
        if threads < 0:
            raise ValueError(f"--threads {threads}: give 0 (torch's default) or more")
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # the worker thread computes with this count
        self.models = Path(args.models) if args.models else project_root() / "models"
        self.max_upload = int(args.max_upload_mb * 1024 * 1024)
        self.max_steps = args.max_steps
        self.own_cache = args.cache is None
        self.cache = Path(tempfile.mkdtemp(prefix="hfedit-ui-") if args.cache is None
                          else args.cache).resolve()
        (self.cache / "jobs").mkdir(parents=True, exist_ok=True)
        self.registry = store_uri(args.registry) if args.registry else None
        if self.registry:
            import mlflow

            mlflow.set_tracking_uri(self.registry)
            mlflow.set_registry_uri(self.registry)
        self.choices: dict[str, Choice] = {}
        self.refresh_choices()
        if not self.choices:
            raise FileNotFoundError(
                f"no edit models in {self.models} (backbone/ and edits/<attribute>/rectifier.json"
                f"){' nor in the registry ' + self.registry if self.registry else ''}: run the "
                "pipeline (./dev run), give --models the folder it wrote, or --registry")
        self.bundled = bundled_faces()
        self.pipelines: dict[str, tuple[Any, Path]] = {}  # folder or uri -> (pipeline, folder)
        self.clips: dict[tuple, Any] = {}  # (model, weights, source, target) -> DirectionalClipLoss
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.waiting: list[str] = []
        self.lock = threading.Lock()
        self.queue: queue.Queue[Optional[Job]] = queue.Queue()
        self.max_queue = args.max_queue
        first = next(iter(self.choices.values()))
        if first.folder is not None:  # load the folder's models now: a broken model fails here
            self.pipeline(first)
        self.worker = threading.Thread(target=self._work, name="hfedit-ui-worker", daemon=True)
        self.worker.start()

    # ---------------------------------------------------------------------------- models
    def refresh_choices(self) -> list[str]:
        """Re-list the attributes (the registry may have new versions); returns notes."""
        found = {c.id: c for c in folder_choices(self.models)}
        notes = []
        if self.registry:
            try:
                found.update((c.id, c) for c in
                             registry_choices(self.registry, self.cfg.runtime.mlflow.registry_prefix))
            except Exception as err:  # the store went away: the folder's models still work
                notes.append(f"registry {self.registry}: {type(err).__name__}: {err}")
        self.choices = found
        return notes

    def pipeline(self, choice: Choice) -> tuple[Any, Path]:
        """The front door for ``choice`` and its models folder: the folder's pipeline (every
        attribute in it), or the registered model fetched into the cache; loaded once."""
        from hfedit.pipeline import HFEditPipeline

        key = str(choice.folder) if choice.folder is not None else choice.uri
        if key in self.pipelines and choice.attribute not in self.pipelines[key][0].attributes:
            del self.pipelines[key]  # an attribute trained since: load the folder again
        if key not in self.pipelines:
            root = choice.folder
            if root is None:
                from pipelines.serving import fetch_model

                name, version = choice.uri[len("models:/"):].rsplit("/", 1)
                root = self.cache / "registry" / name / version
                fetch_model(choice.uri, root)
            pipe = HFEditPipeline.from_pretrained(root, inversion=self.cfg.inversion,
                                                  device=self.device, precision=self.precision)
            self.pipelines[key] = (pipe, Path(root))
        return self.pipelines[key]

    # ------------------------------------------------------------------------------ jobs
    def check_settings(self, num_steps: int, skip: int, seed: int) -> None:
        if not 1 <= num_steps <= self.max_steps:
            raise RequestError(400, f"N = {num_steps}: give 1 to {self.max_steps} steps")
        if not 0 <= skip < num_steps:
            raise RequestError(400, f"skip = {skip}: give 0 to N - 1 = {num_steps - 1}")
        if not 0 <= seed < 2**63:
            raise RequestError(400, f"seed = {seed}: give a whole number from 0")

    def new_job(self, choice_id: str, name: str, num_steps: int, skip: int, seed: int) -> Job:
        choice = self.choices.get(choice_id)
        if choice is None:
            raise RequestError(400, f"unknown attribute {choice_id!r}: reload the page")
        self.check_settings(num_steps, skip, seed)
        if len(self.waiting) >= self.max_queue:
            raise RequestError(503, f"{len(self.waiting)} edits are waiting already (the limit "
                                    "is --max-queue): try again in a moment")
        job_id = uuid.uuid4().hex[:16]
        folder = self.cache / "jobs" / job_id
        folder.mkdir(parents=True)
        return Job(job_id, folder, choice, folder / "input", safe_name(name), num_steps, skip,
                   seed)

    def check_input(self, job: Job) -> None:
        """Decode the job's input strictly (as the front door will); an ImageError becomes the
        page's message, naming the uploaded file instead of the cache path."""
        from hfedit.data.images import REASONS, ImageError, load_image

        try:
            load_image(job.input, self.cfg.data.max_pixels)
        except ImageError as err:
            self.discard(job)
            fix = UPLOAD_FIXES.get(err.reason, REASONS[err.reason])
            detail = err.detail.replace(str(job.input), job.name).rstrip(".")
            raise RequestError(400, f"{job.name}: {detail}. Fix: {fix}") from None

    def enqueue(self, job: Job) -> int:
        with self.lock:
            self.jobs[job.id] = job
            self.waiting.append(job.id)
            position = len(self.waiting)
        self.queue.put(job)
        return position

    def discard(self, job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)

    def status(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id!r} (finished jobs are kept for a while)")
        with self.lock:
            ahead = self.waiting.index(job.id) if job.id in self.waiting else 0
            running = any(j.state == "running" for j in self.jobs.values())
        out = {"id": job.id, "state": job.state, "message": job.message,
               "progress": 1.0 if job.state == "done" else min(job.passes / job.total, 0.99),
               "passes": job.passes, "total": job.total}
        if job.state == "queued":
            out["ahead"] = ahead + (1 if running else 0)
        if job.state == "done":
            out["result"] = job.result
        return out

    def file(self, job_id: str, name: str) -> tuple[Path, str]:
        job = self.jobs.get(job_id)
        if job is None or job.state != "done" or name not in OUTPUTS:
            raise RequestError(404, "no such result")
        stem = Path(job.name).stem
        label = job.choice.attribute if name == "edit" else name
        return job.folder / f"{name}.png", f"{stem}_{label}.png"

    # ---------------------------------------------------------------------------- worker
    def _work(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # per thread under OpenMP: set it where edits run
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self.lock:
                job.state = "running"
                self.waiting.remove(job.id)
            try:
                self._edit(job)
                job.state = "done"
            except Exception as err:  # a job's failure is its page's message, never the server's
                job.state, job.message = "error", f"{type(err).__name__}: {err}"
            finally:
                job.input.unlink(missing_ok=True)
                self._forget_old()

    def _edit(self, job: Job) -> None:
        from hfedit.files import atomic_write

        job.message = "loading the models" if job.choice.folder is None else ""
        pipe, root = self.pipeline(job.choice)
        job.message = ""
        steps = job.num_steps - job.skip
        job.total = job.num_steps + 2 * steps  # inversion, plain replay, modulated replay

        def count(*_):  # a forward hook: returns nothing, so the U-Net's output is unchanged
            job.passes += 1

        hook = pipe.editor.denoiser.unet.register_forward_hook(count)
        try:
            out = pipe(job.input, attributes=[job.choice.attribute, RECONSTRUCTION],
                       num_steps=job.num_steps, skip=job.skip, seed=job.seed)
        finally:
            hook.remove()
        images = {"source": out.source[0], RECONSTRUCTION: out.images[RECONSTRUCTION][0],
                  "edit": out.images[job.choice.attribute][0]}
        for name, image in images.items():
            atomic_write(job.folder / f"{name}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
        metrics = {key: {m: _number(v[0]) for m, v in out.metrics[name].items()}
                   for key, name in (("reconstruction", RECONSTRUCTION),
                                     ("edit", job.choice.attribute))}
        clip = self._clip(pipe, root, job, images)
        stem = Path(job.name).stem
        job.result = {
            "images": {name: f"/api/jobs/{job.id}/{name}.png" for name in OUTPUTS},
            "download": f"{stem}_{job.choice.attribute}.png",
            "metrics": metrics, "clip": clip,
            "settings": {"attribute": job.choice.attribute, "model": job.choice.where,
                         "num_steps": job.num_steps, "skip": job.skip, "seed": job.seed,
                         "eta": pipe.editor.cfg.eta, "mode": pipe.editor.cfg.mode.value,
                         "resolution": pipe.resolution, "threads": self.threads,
                         "device": str(self.device)},
            "cli": (f"OMP_NUM_THREADS={self.threads} hfedit edit {job.name} --attribute "
                    f"{job.choice.attribute} --steps {job.num_steps} --skip {job.skip} --seed "
                    f"{job.seed} --backbone {_short(root / 'backbone')} --edits "
                    f"{_short(root / 'edits')}"),
        }

    def _clip(self, pipe, root: Path, job: Job, images: dict) -> dict[str, Any]:
        """cos(E_I(edit) - E_I(source), E_T(target) - E_T(source)) with the CLIP model and
        texts the edit model records (rectifier.json ``clip`` and ``edit``), else why not."""
        meta_file = root / "edits" / job.choice.attribute / "rectifier.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        clip, edit = meta.get("clip") or {}, meta.get("edit") or {}
        if not clip.get("model") or not edit.get("target"):
            return {"value": None, "note": "not available: this edit model records no CLIP "
                    "model and edit texts (rectifier.json 'clip' and 'edit', written by "
                    "train_edits)"}
        import dataclasses

        import torch

        from hfedit.data.images import to_tensor
        from hfedit.models.clip import DirectionalClipLoss, load_clip

        key = (clip["model"], clip.get("weights", ""), edit.get("source", "a face"), edit["target"])
        try:
            if key not in self.clips:
                cfg = dataclasses.replace(self.cfg.clip, model=key[0], weights=key[1],
                                          allow_random=True)
                self.clips[key] = DirectionalClipLoss(load_clip(cfg, self.device, announce=False),
                                                      key[2], key[3])
            x_src, x_edit = (to_tensor(images[n], pipe.resolution)[None].to(self.device)
                             for n in ("source", "edit"))
            with torch.no_grad():
                value = float(self.clips[key].clip_directional_similarity(x_src, x_edit)[0])
        except Exception as err:  # weights not here (offline hub tag, moved file): say why
            return {"value": None, "note": f"not computed: {err}"}
        semantic = clip.get("semantic", bool(key[1]))
        note = f"'{key[2]}' -> '{key[3]}', {key[0]}"
        if not semantic:
            note += ", random CLIP weights: not semantic"
        return {"value": value, "note": note}

    def _forget_old(self) -> None:
        with self.lock:
            finished = [j for j in self.jobs.values() if j.state in ("done", "error")]
            for job in finished[:max(0, len(finished) - KEEP_JOBS)]:
                self.jobs.pop(job.id, None)
                self.discard(job)

    def close(self) -> None:
        """Stop the worker; remove the cache folder when it is the app's own temporary one."""
        self.queue.put(None)
        if self.own_cache:
            shutil.rmtree(self.cache, ignore_errors=True)


def _short(path: Path) -> str:
    """``path`` relative to the working folder when that is shorter (the CLI hint)."""
    import os

    rel = os.path.relpath(path)
    return rel if len(rel) < len(str(path)) else str(path)


def _number(v: float) -> Any:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def bundled_faces() -> list[tuple[str, Any]]:
    """The real faces shipped in installed wheels (hfedit.data.sources.bundled_images), the
    two photographs first."""
    from hfedit.data.sources import bundled_images

    faces = list(bundled_images())
    return faces[-2:][::-1] + faces[:-2]
