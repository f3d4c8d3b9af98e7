"""DVC stage ``train_edits``: one Ray task per attribute trains its edit rectifier (Algorithm 1).

    python pipelines/train_edits.py --backbone models/backbone --rectifier models/rectifier \
        --data data/prepared --out models/edits --metrics metrics/train_edits.json [--set k=v]

For every entry of ``edits.attributes`` the driver computes a fingerprint of that attribute's
params, the CLIP config (and the Markovian settings when the attribute uses that method), and
the digests of its inputs: the backbone, the reconstruction rectifier, the training split and
the library code that trains it. An attribute whose ``<out>/<name>/rectifier.json`` holds the
same fingerprint is skipped; the others run as Ray tasks in parallel
(``runtime.ray.edit_task_cpus`` / ``edit_task_gpus`` each). Each task opens an MLflow run nested
under the stage's run, trains with :func:`hfedit.training.edits.train_edit`, and publishes
``<out>/<name>/`` atomically (a temporary folder renamed into place), so a failing or killed
task leaves the attribute's previous output as it was. One attribute failing does not stop the
others: its error is recorded in ``<out>/status.json`` and ``<metrics>``, and the stage exits
non-zero naming it once every task has finished. Folders of attributes no longer configured
are removed.

``--backbone``, ``--rectifier``, ``--data`` and ``--out`` may be store URIs (``s3://...``): each
task fetches the models into its node's cache; an edit on a store is uploaded file by file, its
JSON sidecar last (deleted first), so a reader sees it whole or not at all.

With random CLIP weights (``clip.weights: ""``, the offline default) the edits are not semantic:
the stage says so in its log (a warning), as an MLflow tag on every run, and in ``<metrics>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hfedit.models.checkpoint import (
    RECTIFIER,
    atomic_write_json,
    file_digest,
    module_digests,
    fingerprint,
    has_checkpoint,
    model_reference,
    save_rectifier,
)
from hfedit.config import ConfigError, EditMethod, HfeditConfig, to_flat_dict
from hfedit.data.prepared import PreparedData, Split, data_location
from hfedit.device import placement
from hfedit.files import is_temporary, replace_folder
from hfedit.models.clip import NOT_SEMANTIC
from hfedit.storage import Location, copy_tree, is_uri, join, local_copy, remove_tree
from pipelines.entry import parse_and_load, run_main, stage_parser

log = logging.getLogger("hfedit.train_edits")

STAGE = "train_edits"
EDIT_FORMAT = 1  # bump when the meaning of a saved edit rectifier changes
STATUS_FILE = "status.json"
# The library code whose behaviour an edit rectifier depends on (part of every fingerprint).
CODE_MODULES = ("hfedit.training.edits", "hfedit.training.reconstruction", "hfedit.models.rectifier",
                "hfedit.models.modulation", "hfedit.models.clip", "hfedit.diffusion.schedule")


class AttributesFailed(RuntimeError):
    """Some attributes failed; the message names each with its error."""


# ---------------------------------------------------------------------------- fingerprints
def input_digests(backbone: str | Path, rectifier: str | Path, data: str | Path) -> dict[str, Any]:
    """Digests of everything an edit rectifier is trained from, besides its params (models on a
    store: of this node's copy, :func:`hfedit.storage.local_copy`)."""
    code = module_digests(CODE_MODULES)
    backbone, rectifier = local_copy(backbone), local_copy(rectifier)
    return {
        "backbone": file_digest(Path(backbone) / "unet" / "diffusion_pytorch_model.safetensors"),
        "rectifier": file_digest(Path(rectifier) / f"{RECTIFIER}.safetensors"),
        "data": PreparedData(data).digest,
        "code": code,
        "format": EDIT_FORMAT,
    }


def attribute_fingerprint(cfg: HfeditConfig, name: str, inputs: dict[str, Any]) -> str:
    """Fingerprint of attribute ``name``: its params, the CLIP config, the Markovian settings
    when it uses them, and ``inputs`` (:func:`input_digests`)."""
    attr = cfg.edits.attributes[name]
    method = EditMethod(attr.method)
    return fingerprint({
        "attribute": to_flat_dict(attr),
        "clip": to_flat_dict(cfg.clip),
        "markovian": to_flat_dict(cfg.edits.markovian) if method is EditMethod.markovian else None,
        "share_trunk": cfg.edits.share_trunk,
        "inputs": inputs,
    })


def saved_meta(out: str | Path, name: str) -> Optional[dict]:
    """The JSON sidecar of the complete edit rectifier ``out/name`` (a folder or a store
    prefix), else None."""
    loc = Location(out)
    try:
        if loc.local is not None:
            folder = loc.local / name
            return (json.loads((folder / f"{RECTIFIER}.json").read_text())
                    if has_checkpoint(folder, RECTIFIER) else None)
        if loc.size(f"{name}/{RECTIFIER}.safetensors") is None:
            return None
        return json.loads(loc.read_bytes(f"{name}/{RECTIFIER}.json"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def published(out: str, name: str, rectifier, meta: dict, base: Optional[Path] = None):
    """Publish ``out/name/`` whole and yield a local folder holding it. Locally: saved into a
    temporary sibling renamed into place (the previous version renamed away first, deleted
    after). On a store: saved in a temporary folder and uploaded, the JSON sidecar deleted first
    and written last (:func:`saved_meta` takes its presence as the rectifier being complete).
    ``base``: the reconstruction rectifier whose trunk this one shares (only the rest is
    written; local outputs only)."""
    if not is_uri(out):
        yield replace_folder(Path(out) / name,
                             lambda tmp: save_rectifier(tmp, rectifier, meta, base=base))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        save_rectifier(folder, rectifier, meta, base=base)
        copy_tree(folder, join(out, name), last=(f"{RECTIFIER}.json",))
        yield folder


# ------------------------------------------------------------------------------- the task
@dataclass
class Loaded:
    """What every edit-training task loads: the config, the frozen backbone, the
    reconstruction rectifier, CLIP and the training split."""

    cfg: HfeditConfig
    denoiser: Any
    reconstruction: Any
    clip: Any
    images: "Split"  # hfedit.data.prepared.Split: read lazily


def config_from_dict(config: dict) -> HfeditConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HfeditConfig), config))


def config_dict(cfg: HfeditConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def load_inputs(spec: dict, work: str = "training") -> Loaded:
    """Backbone, reconstruction rectifier, CLIP and the training split for a task: the models
    on ``spec["device"]`` (what the driver asked Ray for; else ``runtime.device``) at
    ``runtime.precision``, the images on the CPU (batches move to the device one at a time)."""
    from hfedit.models.backbone import load_backbone
    from hfedit.models.checkpoint import load_rectifier
    from hfedit.models.clip import load_clip
    from hfedit.data.prepared import load_split

    cfg = config_from_dict(spec["cfg"])
    device, precision = placement(spec.get("device", cfg.runtime.device), cfg.runtime.precision,
                                  work)
    # models on a store are fetched into this node's cache (the driver sends URIs, never its paths)
    denoiser = load_backbone(local_copy(spec["backbone"]), device=device, precision=precision)
    recon, _ = load_rectifier(local_copy(spec["rectifier"]), denoiser.unet, device=str(device))
    clip = load_clip(cfg.clip, device, announce=False)  # the driver said it, and the tags do
    # the rectifier's own images (data.rectifier_fraction), read lazily: only the ones trained on
    images = load_split(spec["data"], "rectifier")
    return Loaded(cfg, denoiser, recon, clip, images)


def clip_tags(clip) -> dict[str, str]:
    """A task's MLflow tags about the CLIP it loaded."""
    tags = {"hfedit.clip_model": clip.name, "hfedit.clip_semantic": str(clip.semantic).lower()}
    if not clip.semantic:
        tags["hfedit.warning"] = NOT_SEMANTIC
    return tags


def driver_tags(cfg: HfeditConfig) -> dict[str, str]:
    """The stage run's MLflow tags about CLIP, from the config alone (the driver loads none)."""
    random_clip = not cfg.clip.weights.strip()
    tags = {"hfedit.clip_semantic": str(not random_clip).lower()}
    if random_clip:
        tags["hfedit.warning"] = NOT_SEMANTIC
    return tags


def task_tracking(cfg: HfeditConfig, tracker) -> dict:
    """What a task needs to open its MLflow run nested under the stage's (:func:`mlflow_child`)."""
    from pipelines.tracking import tracking_uri

    return {"uri": tracking_uri(cfg), "experiment_id": tracker.run.info.experiment_id,
            "parent_run_id": tracker.run_id}


def train_logged(loaded: Loaded, name: str, tracker, method: Optional[EditMethod] = None,
                 steps: Optional[int] = None, prefix: str = "edit_training/"):
    """:func:`train_edit` for attribute ``name``, logging every ``edits.log_every`` steps."""
    from hfedit.progress import progress
    from hfedit.training.edits import train_edit

    cfg = loaded.cfg
    every = max(1, cfg.edits.log_every)
    total = steps if steps is not None else cfg.edits.attributes[name].steps

    # one bar per attribute (and method), in the driver's log via Ray: a line every 30 s
    bar = progress(total=total, desc=f"{name}" + (f" ({method.value})" if method else ""),
                   unit="step")

    def on_step(step: int, stats, lr: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}", direction=f"{stats.direction:.4f}",
                        l1=f"{stats.l1:.4f}", refresh=False)
        if tracker is not None and (step % every == 0 or step == total or step == 1):
            tracker.log_metrics({f"{prefix}loss": stats.loss, f"{prefix}direction": stats.direction,
                                 f"{prefix}l1": stats.l1, f"{prefix}delta_rms": stats.delta_rms,
                                 f"{prefix}lr": lr}, step=step)

    with bar:
        return train_edit(cfg.edits.attributes[name], loaded.denoiser, loaded.reconstruction,
                          loaded.clip, loaded.images, cfg.edits.markovian, method=method,
                          steps=steps, on_step=on_step,
                          checkpoint=cfg.runtime.activation_checkpointing,
                          share_trunk=cfg.edits.share_trunk)


def summarise(result, method: EditMethod) -> dict[str, Any]:
    first, last = result.history[0], result.history[-1]
    return {"method": method.value, "steps": len(result.history), "num_images": result.num_images,
            "first_loss": first.loss, "final_loss": last.loss, "final_direction": last.direction,
            "final_l1": last.l1, "final_delta_rms": last.delta_rms,
            "train_seconds": round(result.seconds, 3),
            "seconds_per_step": round(result.seconds_per_step, 4),
            "setup_seconds": round(result.setup_seconds, 3)}


def mlflow_child(spec: dict, run_name: str, tags: dict):
    """The nested MLflow run of a task, or a null context when the stage tracks nothing."""
    from pipelines.tracking import child_run

    m = spec.get("mlflow")
    if not m:
        return contextlib.nullcontext(None)
    return child_run(m["uri"], m["experiment_id"], m["parent_run_id"], run_name, tags)


def run_attribute(spec: dict) -> dict:
    """Train attribute ``spec["attribute"]`` and publish it to ``spec["out"]/<attribute>/``.

    Runs in a Ray task (or in-process); returns the attribute's summary. Raises on failure, after
    marking its MLflow run FAILED with the error as a tag.
    """
    started = time.time()
    cfg = config_from_dict(spec["cfg"])
    torch.set_num_threads(max(1, cfg.runtime.ray.torch_threads_per_worker))
    name = spec["attribute"]
    attr = cfg.edits.attributes[name]
    method = EditMethod(attr.method)
    tags = {"hfedit.stage": STAGE, "hfedit.attribute": name, "hfedit.method": method.value,
            "hfedit.fingerprint": spec["fingerprint"]}
    with mlflow_child(spec, f"edit:{name}", tags) as run:
        try:
            if run is not None:
                run.log_params({f"edit.{k}": v for k, v in to_flat_dict(attr).items()})
                if method is EditMethod.markovian:
                    run.log_params({f"markovian.{k}": v
                                    for k, v in to_flat_dict(cfg.edits.markovian).items()})
            # this node's copies of models on a store: fetched, or checked against the store's
            # listing, once for the task
            local = {k: local_copy(spec[k]) for k in ("backbone", "rectifier")}
            loaded = load_inputs({**spec, **{k: str(v) for k, v in local.items()}})
            if run is not None:
                run.set_tags(clip_tags(loaded.clip))
            result = train_logged(loaded, name, run)
            summary = summarise(result, method)
            meta = {"attribute": name, "edit": to_flat_dict(attr), "fingerprint": spec["fingerprint"],
                    "inputs": spec["inputs"],
                    "backbone": model_reference(spec["backbone"], local["backbone"]),
                    "reconstruction_rectifier": model_reference(spec["rectifier"],
                                                                local["rectifier"]),
                    "clip": {"model": loaded.clip.name, "weights": cfg.clip.weights,
                             "semantic": loaded.clip.semantic, "note": loaded.clip.weights_note},
                    "training": summary}
            if method is EditMethod.markovian:
                meta["markovian"] = to_flat_dict(cfg.edits.markovian)
            base = local["rectifier"] if cfg.edits.share_trunk else None
            with published(spec["out"], name, result.rectifier.cpu(), meta, base) as folder:
                if run is not None:
                    from pipelines.serving import log_rectifier_model

                    log_rectifier_model(
                        cfg, run.run_id, local["backbone"], folder, f"edit-{name}",
                        name, tags={"hfedit.attribute": name, "hfedit.method": method.value,
                                    "hfedit.semantic": str(loaded.clip.semantic).lower(),
                                    "hfedit.clip_model": loaded.clip.name,
                                    "hfedit.fingerprint": spec["fingerprint"],
                                    "hfedit.backbone": meta["backbone"]["source"]})
        except BaseException as err:
            if run is not None:
                run.set_tags({"hfedit.error": f"{type(err).__name__}: {err}"[:4000]})
            raise
    return {**summary, "status": "trained", "fingerprint": spec["fingerprint"],
            "clip_semantic": loaded.clip.semantic, "started_at": started, "finished_at": time.time()}


# ------------------------------------------------------------------------------ the driver
def task_error(err: BaseException) -> str:
    """``Type: message`` of the exception a Ray task raised (unwrapped), first line."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def remove_stale(out: str | Path, keep: set[str]) -> list[str]:
    """Delete attribute folders not in ``keep`` and leftovers of interrupted publishes (on a
    store: the objects under prefixes of attributes not in ``keep``)."""
    if is_uri(out):
        names = {rel.split("/", 1)[0] for rel in Location(out).files() if "/" in rel}
        stale = sorted(n for n in names if not n.startswith(".") and n not in keep)
        for name in stale:
            remove_tree(join(str(out), name))
        return stale
    out = Path(out)
    removed = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith((".tmp-", ".old-")) or is_temporary(p):  # .tmp-/.old-: older code
            shutil.rmtree(p, ignore_errors=True)
        elif not p.name.startswith(".") and p.name not in keep:
            shutil.rmtree(p)
            removed.append(p.name)
    return sorted(removed)


def announce_random_clip(cfg: HfeditConfig, stage: str = STAGE) -> bool:
    """Whether CLIP is random; if so, say it once, loudly (the stage's tasks load CLIP without
    repeating it; the runs' tags and the metrics carry it too). No CLIP is loaded here."""
    random_clip = not cfg.clip.weights.strip()
    if random_clip:
        print(f"\n*** {stage}: {NOT_SEMANTIC} ***\n", file=sys.stderr, flush=True)
    return random_clip


def run_stage(cfg: HfeditConfig, backbone: str | Path, rectifier: str | Path, data: str | Path,
              out: str | Path, tracker=None, mlflow_info: Optional[dict] = None) -> dict:
    """Plan, fan out, collect. Returns the stage report (also what ``<metrics>`` holds).
    ``backbone``, ``rectifier``, ``data`` and ``out`` may be store URIs: tasks are sent the URIs
    (each node fetches the models into its cache), local paths as absolute paths (a
    multi-node cluster needs them on a shared filesystem)."""
    import ray

    from pipelines.ray_runtime import task_placement

    names = list(cfg.edits.attributes)
    if not names:
        raise ConfigError("edits.attributes is empty: nothing to train")
    random_clip = announce_random_clip(cfg)
    inputs = input_digests(backbone, rectifier, data)
    removed = remove_stale(out, set(names))
    report: dict[str, Any] = {"clip": {"model": cfg.clip.model, "weights": cfg.clip.weights,
                                       "semantic": not random_clip},
                              "attributes": {}, "removed": removed}
    if random_clip:
        report["note"] = NOT_SEMANTIC
    todo: dict[str, str] = {}
    for name in names:
        fp = attribute_fingerprint(cfg, name, inputs)
        meta = saved_meta(out, name)
        if meta is not None and meta.get("fingerprint") == fp:
            report["attributes"][name] = {**meta.get("training", {}), "status": "skipped",
                                          "fingerprint": fp,
                                          "clip_semantic": meta.get("clip", {}).get("semantic")}
            log.info("train_edits: %s unchanged (fingerprint %s): skipped", name, fp)
        else:
            todo[name] = fp

    rc = cfg.runtime.ray
    task = ray.remote(run_attribute)
    device, gpus = task_placement(cfg)
    refs = {}
    for name, fp in todo.items():
        spec = {"attribute": name, "cfg": config_dict(cfg), "fingerprint": fp, "inputs": inputs,
                "backbone": _sent(backbone), "rectifier": _sent(rectifier),
                "data": data_location(data), "out": _sent(out),
                "mlflow": mlflow_info, "device": device}
        ref = task.options(num_cpus=rc.edit_task_cpus, num_gpus=gpus,
                           max_retries=rc.max_failures, name=f"{STAGE}:{name}").remote(spec)
        refs[ref] = name
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        name = refs[done[0]]
        try:
            report["attributes"][name] = ray.get(done[0])
            log.info("train_edits: %s trained", name)
        except Exception as err:  # one attribute failing never loses the others
            report["attributes"][name] = {"status": "failed", "fingerprint": todo[name],
                                          "error": task_error(err)}
            log.error("train_edits: %s failed: %s", name, task_error(err))
    report["attributes"] = {n: report["attributes"][n] for n in names}  # params order
    statuses = [a["status"] for a in report["attributes"].values()]
    report.update({k: statuses.count(k) for k in ("trained", "skipped", "failed")})
    status = json.dumps(report["attributes"], indent=1)  # everything, text included
    if is_uri(out):
        Location(out).write_bytes(STATUS_FILE, status.encode())
    else:
        atomic_write_json(Path(out) / STATUS_FILE, report["attributes"])
    if tracker is not None:
        for name, a in report["attributes"].items():
            if "final_loss" in a:
                tracker.log_metrics({f"{STAGE}/{name}/final_loss": a["final_loss"],
                                     f"{STAGE}/{name}/final_direction": a["final_direction"],
                                     f"{STAGE}/{name}/final_l1": a["final_l1"],
                                     f"{STAGE}/{name}/seconds_per_step": a["seconds_per_step"]},
                                    step=a["steps"])
        tracker.log_metrics({f"{STAGE}/{k}": report[k] for k in ("trained", "skipped", "failed")},
                            step=0)
    return report


def _sent(location: str | Path) -> str:
    """How a task is told a location: a URI as is, a local path made absolute."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def failure_message(report: dict) -> str:
    failed = {n: a["error"] for n, a in report["attributes"].items() if a["status"] == "failed"}
    return (f"train_edits: {len(failed)} attribute(s) failed: "
            + "; ".join(f"{n} ({e})" for n, e in failed.items()))


def check_locations(cfg: HfeditConfig, args) -> None:
    """The store URIs among the arguments reachable, before any work; an edit sharing the
    reconstruction rectifier's trunk names it by a relative path, so only in a local folder."""
    from hfedit.validation import UsageError, check_stores

    check_stores(args, ("--backbone", "--rectifier", "--data"), ("--out",))
    if is_uri(args.out) and cfg.edits.share_trunk:
        raise UsageError(f"--out {args.out}: edits.share_trunk=true saves each edit with a "
                         "relative path to the reconstruction rectifier, which a store prefix "
                         "cannot hold: give a local --out, or set edits.share_trunk=false")


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("Edit rectifiers, one Ray task per attribute.", data=True)
    store = "a folder, or a store URI (s3://bucket/prefix)"
    parser.add_argument("--backbone", default="models/backbone", help=f"the backbone: {store}")
    parser.add_argument("--rectifier", default="models/rectifier",
                        help=f"the reconstruction rectifier: {store}")
    parser.add_argument("--out", default="models/edits", help=f"the edit rectifiers: {store}")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train_edits.json"))
    args, cfg = parse_and_load(parser, argv)
    check_locations(cfg, args)
    from pipelines.ray_runtime import init_ray
    from pipelines.tracking import stage_run, write_metrics

    init_ray(cfg)
    with stage_run(cfg, STAGE, tags=driver_tags(cfg)) as tracker:
        report = run_stage(cfg, args.backbone, args.rectifier, args.data, args.out, tracker,
                           task_tracking(cfg, tracker))
        for path in write_metrics(args.metrics, report, STAGE):  # headline + the whole report
            tracker.log_artifact(path)
        with tempfile.TemporaryDirectory() as tmp:
            status = Path(tmp) / STATUS_FILE
            status.write_bytes(Location(args.out).read_bytes(STATUS_FILE))
            tracker.log_artifact(status)
        for name, a in report["attributes"].items():
            print(f"train_edits: {name}: {a['status']}"
                  + (f" ({a['error']})" if "error" in a else
                     f" (loss {a.get('first_loss', float('nan')):.4f} -> "
                     f"{a.get('final_loss', float('nan')):.4f})"))
        if report["failed"]:
            raise AttributesFailed(failure_message(report))
    return report


if __name__ == "__main__":
    run_main(STAGE, main, failures=(AttributesFailed,),
             uri_flags=("--backbone", "--rectifier", "--data", "--out"))
