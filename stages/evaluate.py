"""DVC stage ``evaluate``: the paper's comparisons, on held-out images, in one report.

    python stages/evaluate.py --backbone models/backbone --rectifier models/rectifier \
        --edits models/edits --data data/prepared --batch outputs/val \
        --ablation plots/edit_ablation/report.json --out eval

On the first ``evaluate.images`` val images, at every ``N`` in ``evaluate.steps``:

- reconstruction, backbone vs rectifier x DDIM inversion vs edit-friendly inversion: L1, L2,
  SSIM, PSNR, max error (LPIPS too when its weights are on disk, else a note why not), the
  noise gap per model and PDAE's posterior-mean gap per model and N;
- SDEdit (the paper's Fig. 7) at ``evaluate.sdedit_strengths``, with and without the
  reconstruction rectifier, from the same noise;
- editing, per attribute with an edit rectifier: directional CLIP similarity, L1/SSIM/PSNR to
  the source, dlib identity similarity where a face is large enough (else "not applicable" with
  the reason); the same with the rectifier conditioned on the inversion's trajectory and live
  (``inversion.condition``), side by side, with the mean/max difference between the two edits;
- score matching vs Markovian edit training: read from the ``edit_ablation`` stage's metrics;
- the batch run (``edit_batch``): images done and failed per attribute, mean fidelity.

Writes ``<out>/metrics.json`` (DVC metrics: the headline numbers at the headline N,
``pipelines.tracking.HEADLINE``), ``<out>/report.json`` (everything: every N, standard deviations, image counts, notes, the
machine), ``<out>/reconstruction.csv`` and ``<out>/editing/<attribute>.csv`` (DVC plots),
``<out>/plots/*.png``, a labelled before/after grid per attribute in ``<out>/grids/`` (rows:
source, then the edit at each N) and ``<out>/results.md`` (the results table the README links to).
Everything goes to the stage's MLflow run (``evaluate/<group>/n<N>/<metric>`` for every N, at
step 0), the headline numbers (``evaluate/<group>/<metric>``) also to the pipeline run.

``--backbone``, ``--rectifier``, ``--edits``, ``--batch`` and ``--data`` may be store URIs
(``s3://bucket/prefix``): the models are fetched into this machine's cache, of the batch job's
output only its manifest; ``--out`` is a local folder (DVC outputs, MLflow artifacts).

The comparisons are :mod:`hfedit.evaluation.comparisons`, the tables and metric names
:mod:`hfedit.evaluation.report`, the CSVs, figures and grids :mod:`hfedit.evaluation.plots`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from hfedit.config import ConfigError, HfeditConfig
from hfedit.device import placement
from hfedit.evaluation.comparisons import (
    batch_summary,
    clip_summary,
    evaluate_edits,
    evaluate_reconstruction,
    evaluate_sdedit,
    headline_steps,
    held_out,
)
from hfedit.evaluation.plots import (
    plot_editing,
    plot_reconstruction,
    write_edit_grids,
    write_editing_csvs,
    write_reconstruction_csv,
)
from hfedit.evaluation.report import headline_metrics, machine, per_n_metrics, results_markdown
from hfedit.files import atomic_write_json, atomic_write_text
from hfedit.progress import progress
from pipelines.entry import parse_and_load, run_main, stage_parser
from pipelines.tracking import finite, headline, nest_metrics

log = logging.getLogger("hfedit.evaluate")
STAGE = "evaluate"


def shown(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics``, as floats: what MLflow and DVC can show."""
    return {k: float(v) for k, v in metrics.items() if finite(v)}


def run(cfg: HfeditConfig, backbone: Path, rectifier_dir: Path, edits_dir: Path, data: Path,
        batch: Path, ablation: Path, out: Path, tracker=None) -> dict[str, Any]:
    """Evaluate, write every declared output to ``out`` and log to ``tracker`` (a
    :class:`pipelines.tracking.StageRun`, or None); returns the report."""
    from hfedit.editing.editor import load_edit_rectifiers
    from hfedit.models.backbone import load_backbone
    from hfedit.models.checkpoint import load_rectifier
    from hfedit.models.clip import RandomClipWarning, load_clip

    if not cfg.evaluate.steps or any(int(n) < 1 for n in cfg.evaluate.steps):
        raise ConfigError(f"evaluate.steps={list(cfg.evaluate.steps)}: give step counts >= 1")
    started = time.perf_counter()
    torch.manual_seed(0)
    device, precision = placement(cfg.runtime.device, cfg.runtime.precision, "evaluation")
    denoiser = load_backbone(backbone, device, precision)
    rectifier, _ = load_rectifier(rectifier_dir, denoiser.unet, device=str(device))
    images = held_out(data, cfg.evaluate.images)  # on the CPU; evaluations move one batch at a time
    steps = sorted(int(n) for n in cfg.evaluate.steps)
    head = headline_steps(cfg)
    report: dict[str, Any] = {
        "images": int(images.shape[0]), "resolution": int(images.shape[-1]), "steps": steps,
        "headline_steps": head, "inversion": {"eta": cfg.inversion.eta, "seed": cfg.inversion.seed},
        "mode": cfg.inversion.mode.value,
        "machine": machine(), "device": str(device), "precision": precision.value,
    }
    # the phases, each minutes long on a CPU: a bar (a line per 30 s off a terminal) with an ETA
    bar = progress(total=4, desc="evaluate", unit="phase")
    bar.set_postfix_str(f"reconstruction at N={steps}")
    log.info("evaluate: reconstruction at N=%s on %d images", steps, images.shape[0])
    report["reconstruction"] = evaluate_reconstruction(cfg, denoiser, rectifier, images)
    bar.update(1)
    bar.set_postfix_str(f"SDEdit at N={head}")
    log.info("evaluate: SDEdit at strengths %s, N=%d", list(cfg.evaluate.sdedit_strengths), head)
    report["sdedit"] = evaluate_sdedit(cfg, denoiser, rectifier, images, head)
    bar.update(1)

    edits = (load_edit_rectifiers(edits_dir, denoiser.unet, device=device)
             if edits_dir.is_dir() else {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomClipWarning)
        clip = load_clip(cfg.clip, device)
    report["clip"] = clip_summary(cfg, clip)
    bar.set_postfix_str(f"editing {', '.join(sorted(edits))}")
    log.info("evaluate: editing %s", sorted(edits))
    (report["editing"], edited, report["conditioning"],
     report["modes"]) = evaluate_edits(cfg, denoiser, edits, clip, images)
    bar.update(1)
    bar.set_postfix_str("tables, plots, grids")
    report["ablation"] = (json.loads(ablation.read_text()) if ablation.is_file()
                          else {"note": f"{ablation} not found: run the edit_ablation stage"})
    report["batch"] = batch_summary(batch)

    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    rows = report["reconstruction"]["rows"]
    write_reconstruction_csv(rows, out / "reconstruction.csv")
    write_editing_csvs(report["editing"], out / "editing")
    plot_reconstruction(rows, report["reconstruction"]["gap"], out / "plots" / "reconstruction.png")
    if report["editing"]:
        plot_editing(report["editing"], out / "plots" / "editing.png")
    write_edit_grids(images, edited, out / "grids")
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "results.md", results_markdown(report))
    atomic_write_json(out / "report.json", report)
    heads = shown(headline_metrics(report))
    atomic_write_json(out / "metrics.json", headline(nest_metrics(heads, STAGE), STAGE))
    bar.update(1)
    bar.close()

    if tracker is not None:
        tracker.log_metrics({**shown(per_n_metrics(report)), **heads}, step=0)
        tracker.log_artifacts(out, "eval")
        parent = tracker.parent()
        if parent is not None:
            parent.log_metrics(heads, step=0)
            parent.log_artifact(out / "results.md", "eval")
    return report


def fetched(args, tmp: Path) -> tuple[Path, Path, Path, Path]:
    """The backbone, rectifier, edits and batch folders as local folders: those given as store
    URIs fetched (models into this machine's cache, :func:`hfedit.storage.local_copy`; of the
    batch job's output only its manifest, into ``tmp``), each checked before any work."""
    from hfedit.data.batch_manifest import MANIFEST
    from hfedit.storage import Location, is_uri, local_copy
    from hfedit.validation import check_stores

    check_stores(args, ("--backbone", "--rectifier", "--edits", "--batch", "--data"))
    edits = Location(args.edits)
    batch = Path(args.batch)
    if is_uri(args.batch):
        batch = tmp / "batch"
        batch.mkdir()
        if Location(args.batch).size(MANIFEST) is not None:
            (batch / MANIFEST).write_bytes(Location(args.batch).read_bytes(MANIFEST))
    return (local_copy(args.backbone), local_copy(args.rectifier),
            local_copy(args.edits) if edits.local is None and edits.files() else Path(args.edits),
            batch)


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("Evaluate reconstruction and editing (DVC stage).", data=True)
    store = "a folder, or a store URI (s3://bucket/prefix)"
    parser.add_argument("--backbone", default="models/backbone", help=store)
    parser.add_argument("--rectifier", default="models/rectifier", help=store)
    parser.add_argument("--edits", default="models/edits", help=store)
    parser.add_argument("--batch", default="outputs/val",
                        help=f"the edit_batch job's output (its manifest is read): {store}")
    parser.add_argument("--ablation", type=Path, default=Path("plots/edit_ablation/report.json"),
                        help="the edit_ablation stage's report")
    parser.add_argument("--out", type=Path, default=Path("eval"))
    args, cfg = parse_and_load(parser, argv)
    import tempfile

    from pipelines.tracking import stage_run

    with tempfile.TemporaryDirectory() as tmp, stage_run(cfg, STAGE) as tracker:
        backbone, rectifier, edits, batch = fetched(args, Path(tmp))
        report = run(cfg, backbone, rectifier, edits, args.data, batch, args.ablation, args.out,
                     tracker)
    print((args.out / "results.md").read_text())
    if not report["reconstruction"]["lpips"]:
        print(f"evaluate: LPIPS not computed: {report['reconstruction']['lpips_note']}")
    return report


if __name__ == "__main__":
    run_main(STAGE, main, failures=(ValueError, FileNotFoundError, KeyError),
             uri_flags=("--backbone", "--rectifier", "--edits", "--batch", "--data"))
