"""DVC stage ``edit_ablation``: score-matching vs Markovian edit training (the paper's Fig. 6).

    python pipelines/edit_ablation.py --backbone models/backbone --rectifier models/rectifier \
        --data data/prepared --metrics metrics/edit_ablation.json --plots plots/edit_ablation

Trains ``edits.ablation.attribute`` twice from the same reconstruction rectifier, once per
method, at an equal budget (``edits.ablation.steps`` optimisation steps of the attribute's batch
size; 0 = the attribute's own ``steps``), as two Ray tasks in parallel, each an MLflow run nested
under the stage's. Both are then evaluated on the first ``eval_images`` held-out (val) images
(the same seeds) on their *own* interval and on the *full* one, as the paper's Fig. 6 does
(:func:`hfedit.evaluation.edits.ablation_intervals`): score matching through the whole chain with
the ``inversion`` settings; Markovian by DDIM inversion + sampling from ``edits.markovian.t0``
(where it was trained) and from x_T. Scores: directional CLIP similarity (edit strength) and
fidelity to the source (L1, SSIM, PSNR, dlib identity where faces reach ``min_face_px``), each
mean ± std over the images. Beside them: the backbone alone ("no rectifier") on each interval,
and the replay through the reconstruction rectifier (the no-edit reference). A method's
top-level scores are those of its own interval. Writes ``<metrics>`` (DVC metrics: the means,
named as in MLflow, ``edit_ablation/<method>/<interval>/<metric>``), ``<plots>/report.json``
(everything: standard deviations, intervals, settings, notes; ``evaluate`` reads it) and
``<plots>/grid.png`` (labelled rows: source, reconstruction rectifier, score matching (own),
Markovian (own), Markovian (full), backbone on the full DDIM interval).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from hfedit.files import atomic_write_json
from hfedit.config import ConfigError, EditMethod, HfeditConfig, to_flat_dict
from hfedit.data.prepared import data_location
from hfedit.evaluation.comparisons import held_out, image_seeds
from hfedit.evaluation.identity import identity_scorer
from hfedit.evaluation.report import ABLATION_REFERENCE
from hfedit.models.clip import NOT_SEMANTIC
from pipelines.entry import parse_and_load, run_main, stage_parser
from pipelines.tracking import finite, headline, nest_metrics
from pipelines.train_edits import (
    announce_random_clip,
    clip_tags,
    config_dict,
    config_from_dict,
    driver_tags,
    load_inputs,
    mlflow_child,
    summarise,
    task_error,
    task_tracking,
    train_logged,
)

log = logging.getLogger("hfedit.edit_ablation")
STAGE = "edit_ablation"
METHODS = (EditMethod.score_matching, EditMethod.markovian)


class AblationFailed(RuntimeError):
    pass


def held(cfg: HfeditConfig, data: Path) -> tuple[torch.Tensor, list[int]]:
    """The first ``edits.ablation.eval_images`` val images and their seeds
    (``inversion.seed + index``)."""
    images = held_out(data, cfg.edits.ablation.eval_images)
    return images, image_seeds(cfg.inversion.seed, images.shape[0])


def intervals(cfg: HfeditConfig, schedule) -> dict:
    """``{method: {"own", "full"}}`` and the backbone's, for this config (the module doc)."""
    from hfedit.evaluation.edits import ablation_intervals

    return ablation_intervals(cfg.inversion, cfg.edits.markovian.t0, schedule)


def evaluate(cfg: HfeditConfig, denoiser, clip, rectifier, data: Path, interval=None,
             images_seeds=None):
    """Edit the held-out images through ``rectifier`` (None: the backbone alone) on
    ``interval`` (an :class:`hfedit.evaluation.edits.EditInterval`; None: ``cfg.inversion`` as
    it is) and score them (see the module doc). ``images_seeds``: ``(images, seeds)`` when
    already loaded (else :func:`held` of ``data``)."""
    from hfedit.models.clip import DirectionalClipLoss
    from hfedit.evaluation.edits import evaluate_edit
    from hfedit.editing.editor import RECONSTRUCTION, Editor

    ab = cfg.edits.ablation
    attr = cfg.edits.attributes[ab.attribute]
    images, seeds = images_seeds if images_seeds is not None else held(cfg, data)  # on the CPU
    scorer, note = identity_scorer(ab.min_face_px, int(images.shape[-1]))
    inversion = cfg.inversion if interval is None else interval.inversion(cfg.inversion)
    name = RECONSTRUCTION if rectifier is None else ab.attribute
    editor = Editor(denoiser, inversion, {} if rectifier is None else {name: rectifier})
    direction = DirectionalClipLoss(clip, attr.source, attr.target)
    return evaluate_edit(editor, name, images, seeds, direction, scorer,
                         batch_size=cfg.runtime.eval_batch_size, identity_note=note)


def interval_summary(ev, interval) -> dict:
    """An evaluation's summary with the interval it ran on."""
    return {**ev.summary(), "interval": interval.label, "mode": interval.mode,
            "start": interval.start, "skip": interval.skip, "num_steps": interval.num_steps}


def run_method(spec: dict) -> dict:
    """Ray task: train the ablation attribute with ``spec["method"]`` and evaluate it."""
    cfg = config_from_dict(spec["cfg"])
    torch.set_num_threads(max(1, cfg.runtime.ray.torch_threads_per_worker))
    ab = cfg.edits.ablation
    method = EditMethod(spec["method"])
    tags = {"hfedit.stage": STAGE, "hfedit.attribute": ab.attribute, "hfedit.method": method.value}
    with mlflow_child(spec, f"ablation:{ab.attribute}:{method.value}", tags) as run:
        try:
            loaded = load_inputs(spec)
            if run is not None:
                run.set_tags(clip_tags(loaded.clip))
                params = {f"edit.{k}": v for k, v in
                          to_flat_dict(cfg.edits.attributes[ab.attribute]).items()}
                params.update({"edit.method": method.value, "edit.steps": spec["steps"]})
                params.update({f"markovian.{k}": v
                               for k, v in to_flat_dict(cfg.edits.markovian).items()})
                run.log_params(params)
            result = train_logged(loaded, ab.attribute, run, method=method, steps=spec["steps"])
            images_seeds = held(cfg, spec["data"])
            spans = intervals(cfg, loaded.denoiser.schedule)[method.value]
            evs = {"own": evaluate(cfg, loaded.denoiser, loaded.clip, result.rectifier, None,
                                   spans["own"], images_seeds)}
            evs["full"] = (evs["own"] if spans["full"] == spans["own"] else
                           evaluate(cfg, loaded.denoiser, loaded.clip, result.rectifier, None,
                                    spans["full"], images_seeds))
            ev = evs["own"]
            summary = {**summarise(result, method), **interval_summary(ev, spans["own"]),
                       "intervals": {k: interval_summary(e, spans[k]) for k, e in evs.items()}}
            if run is not None:
                run.log_metrics({f"{STAGE}/{which}/{k}": v for which, r in summary["intervals"].items()
                                 for k, v in r.items() if finite(v)}, step=spec["steps"])
        except BaseException as err:
            if run is not None:
                run.set_tags({"hfedit.error": f"{type(err).__name__}: {err}"[:4000]})
            raise
    return {"summary": summary, "edited": ev.edited.numpy(), "edited_full": evs["full"].edited.numpy(),
            "per_image": {k: v.tolist() for k, v in ev.per_image.items()}}


def compare(sm: dict, mk: dict) -> dict[str, Any]:
    """Score matching minus Markovian, per metric, and which is better on each."""
    better_high = {"clip_direction": True, "ssim": True, "psnr": True, "identity": True,
                   "l1": False}
    out: dict[str, Any] = {}
    for key, high in better_high.items():
        a, b = sm.get(key), mk.get(key)
        if not isinstance(a, float) or not isinstance(b, float) or a != a or b != b:
            continue
        out[f"{key}_difference"] = a - b
        out[f"{key}_better"] = "score_matching" if (a > b) == high and a != b else (
            "equal" if a == b else "markovian")
    return out


def ablation_metrics(report: dict) -> dict[str, float]:
    """The ablation's numbers, named ``edit_ablation/<method>/<interval>/<metric>`` (method:
    score_matching, markovian, backbone, reconstruction_rectifier; interval: own or full): the
    stage's MLflow metrics (at the step budget) and, nested, its DVC metrics file. Means only;
    the standard deviations, interval labels, settings and notes are in the report."""
    keys = ("clip_direction", "l1", "ssim", "psnr", "identity")
    out: dict[str, Any] = {}
    for m in METHODS:
        r = report.get(m.value) or {}
        for which, v in (r.get("intervals") or {}).items():
            out.update({f"{STAGE}/{m.value}/{which}/{k}": v.get(k) for k in keys})
        out[f"{STAGE}/{m.value}/training/final_loss"] = r.get("final_loss")  # (times: report)
    for which, v in (report.get("backbone") or {}).items():
        out.update({f"{STAGE}/backbone/{which}/{k}": v.get(k) for k in keys})
    ref = report.get(ABLATION_REFERENCE)
    if isinstance(ref, dict):
        out.update({f"{STAGE}/{ABLATION_REFERENCE}/own/{k}": ref.get(k) for k in keys})
    for k, v in (report.get("comparison") or {}).items():
        out[f"{STAGE}/score_matching_minus_markovian/{k.removesuffix('_difference')}"] = v
    return {k: float(v) for k, v in out.items() if finite(v)}


def run_stage(cfg: HfeditConfig, backbone: Path, rectifier: Path, data: Path, plots: Path,
              tracker=None, mlflow_info: Optional[dict] = None) -> dict:
    import ray

    from pipelines.ray_runtime import task_placement

    from hfedit.data.grids import make_grid_png

    ab = cfg.edits.ablation
    if not ab.enabled:
        return {"enabled": False}
    if ab.attribute not in cfg.edits.attributes:
        raise ConfigError(f"edits.ablation.attribute='{ab.attribute}' is not in edits.attributes "
                          f"({sorted(cfg.edits.attributes)})")
    attr = cfg.edits.attributes[ab.attribute]
    steps = ab.steps or attr.steps
    random_clip = announce_random_clip(cfg, STAGE)
    report: dict[str, Any] = {
        "enabled": True, "attribute": ab.attribute, "source": attr.source, "target": attr.target,
        "steps": steps, "batch_size": attr.batch_size, "eval_images": ab.eval_images,
        "inversion": to_flat_dict(cfg.inversion), "markovian_settings": to_flat_dict(cfg.edits.markovian),
        "clip": {"model": cfg.clip.model, "semantic": not random_clip}}
    if random_clip:
        report["note"] = NOT_SEMANTIC
    rc = cfg.runtime.ray
    task = ray.remote(run_method)
    device, gpus = task_placement(cfg)
    refs = {}
    for method in METHODS:
        spec = {"method": method.value, "steps": steps, "cfg": config_dict(cfg),
                "backbone": str(backbone.resolve()), "rectifier": str(rectifier.resolve()),
                "data": data_location(data), "mlflow": mlflow_info, "device": device}
        refs[method] = task.options(num_cpus=rc.edit_task_cpus, num_gpus=gpus,
                                    max_retries=rc.max_failures,
                                    name=f"{STAGE}:{method.value}").remote(spec)
    results, errors = {}, {}
    for method, ref in refs.items():
        try:
            results[method] = ray.get(ref)
            report[method.value] = results[method]["summary"]
        except Exception as err:
            errors[method.value] = task_error(err)
            report[method.value] = {"status": "failed", "error": task_error(err)}

    # The no-edit reference and the grid, in the driver (cheap next to training).
    spec = {"cfg": config_dict(cfg), "backbone": str(backbone), "rectifier": str(rectifier),
            "data": str(data)}
    loaded = load_inputs(spec, work="evaluation")
    images_seeds = held(cfg, data)
    spans = intervals(cfg, loaded.denoiser.schedule)
    ref_ev = evaluate(cfg, loaded.denoiser, loaded.clip, loaded.reconstruction, data,
                      spans["score_matching"]["own"], images_seeds)
    report[ABLATION_REFERENCE] = interval_summary(ref_ev, spans["score_matching"]["own"])
    backbone = {k: evaluate(cfg, loaded.denoiser, loaded.clip, None, data, iv, images_seeds)
                for k, iv in spans["backbone"].items()}
    report["backbone"] = {k: interval_summary(e, spans["backbone"][k]) for k, e in backbone.items()}
    report["intervals"] = {m: {k: iv.label for k, iv in v.items()} for m, v in spans.items()}
    if len(results) == len(METHODS):
        report["comparison"] = compare(report["score_matching"], report["markovian"])
    images, _ = images_seeds
    rows, labels = [images, ref_ev.edited], ["source", "reconstruction rectifier"]
    for m in METHODS:
        if m in results:
            rows.append(torch.from_numpy(results[m]["edited"]))
            labels.append(f"{m.value.replace('_', ' ')} (own)")
    if EditMethod.markovian in results:
        rows.append(torch.from_numpy(results[EditMethod.markovian]["edited_full"]))
        labels.append("markovian (full)")
    rows.append(backbone["full"].edited)
    labels.append("backbone (full)")
    plots.mkdir(parents=True, exist_ok=True)
    make_grid_png(torch.cat(rows), plots / "grid.png", nrow=images.shape[0], row_labels=labels)
    if tracker is not None:
        tracker.log_metrics(ablation_metrics(report), step=steps)
        tracker.log_artifact(plots / "grid.png", "plots")
    if errors:
        report["failed"] = errors
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("Score matching vs Markovian edit training.", data=True)
    parser.add_argument("--backbone", type=Path, default=Path("models/backbone"))
    parser.add_argument("--rectifier", type=Path, default=Path("models/rectifier"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/edit_ablation.json"))
    parser.add_argument("--plots", type=Path, default=Path("plots/edit_ablation"))
    args, cfg = parse_and_load(parser, argv)
    from pipelines.ray_runtime import init_ray
    from pipelines.tracking import stage_run

    start = time.perf_counter()
    if cfg.edits.ablation.enabled:
        init_ray(cfg)
    with stage_run(cfg, STAGE, tags=driver_tags(cfg)) as tracker:
        report = run_stage(cfg, args.backbone, args.rectifier, args.data, args.plots, tracker,
                           task_tracking(cfg, tracker))
        report["seconds"] = round(time.perf_counter() - start, 1)
        # DVC metrics: numbers only; the whole report (stds, intervals, settings, notes) beside
        # the grid, where evaluate reads it for its results table.
        args.plots.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.plots / "report.json", report)
        atomic_write_json(args.metrics, headline(nest_metrics(ablation_metrics(report), STAGE),
                                                 STAGE) if report["enabled"] else {})
        tracker.log_artifact(args.metrics)
        tracker.log_artifact(args.plots / "report.json")
        if not report["enabled"]:
            print("edit_ablation: disabled (edits.ablation.enabled=false)")
            return report
        for name in [m.value for m in METHODS] + [ABLATION_REFERENCE]:
            r = report[name]
            if "error" in r:
                print(f"edit_ablation: {name}: FAILED ({r['error']})")
                continue
            print(f"edit_ablation: {name:>24}: clip_direction {r['clip_direction']:+.4f}  "
                  f"L1 {r['l1']:.4f}  SSIM {r['ssim']:.4f}  PSNR {r['psnr']:.2f}"
                  + (f"  identity {r['identity']:.3f}" if r.get("identity") is not None else "")
                  + (f"  ({r['seconds_per_step']:.2f} s/step)" if "seconds_per_step" in r else "")
                  + f"  [{r.get('interval', '')}]")
            for which, v in (r.get("intervals") or {}).items():
                if which != "own":
                    print(f"edit_ablation: {name + ' ' + which:>24}: clip_direction "
                          f"{v['clip_direction']:+.4f}  L1 {v['l1']:.4f}  [{v['interval']}]")
        for which, v in report["backbone"].items():
            print(f"edit_ablation: {'backbone ' + which:>24}: clip_direction "
                  f"{v['clip_direction']:+.4f}  L1 {v['l1']:.4f}  [{v['interval']}]")
        if "failed" in report:
            raise AblationFailed("edit_ablation: failed: " + "; ".join(
                f"{m} ({e})" for m, e in report["failed"].items()))
    return report


if __name__ == "__main__":
    run_main(STAGE, main, failures=(AblationFailed,))
