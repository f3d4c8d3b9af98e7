"""DVC stage ``evaluate``: the paper's comparisons, on held-out images, in one report.

    python stages/evaluate.py --backbone models/backbone --rectifier models/rectifier \
        --edits models/edits --data data/prepared --batch outputs/val \
        --ablation plots/edit_ablation/report.json --out eval

On the first ``evaluate.images`` val images, at every ``N`` in ``evaluate.steps``:

- reconstruction, backbone vs rectifier x DDIM inversion vs edit-friendly inversion: L1, L2,
  SSIM, PSNR, max error (LPIPS too when its weights are on disk, else a note why not), and the
  posterior gap per model;
- editing, per attribute with an edit rectifier: directional CLIP similarity, L1/SSIM/PSNR to
  the source, dlib identity similarity where a face is large enough (else "not applicable" with
  the reason); the same with the rectifier conditioned on the inversion's trajectory and live
  (``inversion.condition``), side by side, with the mean/max difference between the two edits;
- score matching vs Markovian edit training: read from the ``edit_ablation`` stage's metrics;
- the batch run (``edit_batch``): images done and failed per attribute, mean fidelity.

Writes ``<out>/metrics.json`` (DVC metrics: the results table's means at the headline N, numbers
only), ``<out>/report.json`` (everything: every N, standard deviations, image counts, notes, the
machine), ``<out>/reconstruction.csv`` and ``<out>/editing/<attribute>.csv`` (DVC plots),
``<out>/plots/*.png``, a labelled before/after grid per attribute in ``<out>/grids/`` (rows:
source, then the edit at each N) and ``<out>/results.md`` (the README's results table).
Everything goes to the stage's MLflow run (``evaluate/<group>/n<N>/<metric>`` for every N, at
step 0), the headline numbers (``evaluate/<group>/<metric>``) also to the pipeline run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from hfedit.files import atomic_write_json
from hfedit.config import ConfigError, HfeditConfig, load_config
from hfedit.data.prepared import data_location
from hfedit.device import DeviceUnavailable, placement
from hfedit.files import atomic_savefig, atomic_write_csv, atomic_write_text
from pipelines.tracking import finite, nest_metrics

log = logging.getLogger("hfedit.evaluate")
STAGE = "evaluate"
# The paper's Table 1 (CelebA-HQ 256, DDIM inversion + sampling): L1 without / with the rectifier.
PAPER_L1 = {"backbone": 0.090, "rectifier": 0.085}
# Images per before/after grid: evaluate.images may be the paper's ~100 (Table 2) or 10,000
# (Table 1); a grid that wide is unreadable and large.
GRID_IMAGES = 8
# What the side-by-side tables (conditionings, modes) show of each edit's summary.
TABLE_KEYS = ("clip_direction", "clip_direction_std", "l1", "l1_std", "ssim", "ssim_std",
              "psnr", "psnr_std", "identity", "identity_std", "images")


# ------------------------------------------------------------------------------- computing
def held_out(cfg: HfeditConfig, data: Path) -> torch.Tensor:
    from hfedit.data.prepared import load_split

    images = load_split(data, "val")[: cfg.evaluate.images]
    if images.shape[0] == 0:
        raise ValueError(f"{data}: the val split holds no images: nothing to evaluate "
                         "(raise data.val_fraction or add images)")
    return images


def evaluate_reconstruction(cfg: HfeditConfig, denoiser, rectifier, images) -> dict[str, Any]:
    from hfedit.evaluation import metrics as M
    from hfedit.evaluation.reconstruction import (
        mean_std,
        noise_mse,
        posterior_mean_gaps,
        reconstruction_table,
    )

    with_lpips, lpips_note = M.lpips_available()
    bs = cfg.runtime.eval_batch_size
    rows = reconstruction_table(denoiser, images, cfg.evaluate.steps, rectifier,
                                eta=cfg.inversion.eta, seed=cfg.inversion.seed, batch_size=bs,
                                with_lpips=with_lpips)
    models = {"backbone": None, **({"rectifier": rectifier} if rectifier is not None else {})}
    gaps = {name: mean_std(noise_mse(denoiser, images, rect, cfg.inversion.seed, bs,
                                     cfg.evaluate.gap_timesteps))
            for name, rect in models.items()}
    mean_gaps = posterior_mean_gaps(denoiser, images, cfg.evaluate.steps, rectifier,
                                    cfg.inversion.seed, bs)
    return {"rows": rows, "gap": {m: g["mean"] for m, g in gaps.items()},
            "gap_std": {m: g["std"] for m, g in gaps.items()},
            "posterior_mean_gap": mean_gaps,
            "lpips": with_lpips, "lpips_note": lpips_note}


def evaluate_edits(cfg: HfeditConfig, denoiser, edits: dict, clip, images
                   ) -> tuple[dict, dict, dict, dict]:
    """``({attribute: [summary per N]}, {attribute: [(N, edited)]}, {attribute: [conditioning
    comparison per N]}, {attribute: [mode comparison per N]})``: the summaries and edits are
    those of ``inversion.mode`` and ``inversion.condition``; the conditioning comparison scores
    both conditionings (:class:`hfedit.config.Conditioning`) in that mode, the mode comparison
    both modes (:class:`hfedit.config.EditMode`: edit-friendly replay, DDIM inversion +
    sampling) under that conditioning, side by side with the mean and max absolute difference
    between their edits."""
    from hfedit.models.clip import DirectionalClipLoss
    from hfedit.config import Conditioning, EditMode
    from hfedit.evaluation.edits import evaluate_edit
    from hfedit.editing.editor import Editor
    from pipelines.edit_ablation import identity_scorer

    seeds = [cfg.inversion.seed + i for i in range(images.shape[0])]
    scorer, note = identity_scorer(cfg.edits.ablation.min_face_px, int(images.shape[-1]))
    default = Conditioning(cfg.inversion.condition)
    mode = EditMode(cfg.inversion.mode)
    other = EditMode.ddim if mode is EditMode.edit_friendly else EditMode.edit_friendly
    results: dict[str, list] = {}
    edited: dict[str, list] = {}
    compared: dict[str, list] = {}
    modes: dict[str, list] = {}

    def side_by_side(n: int, evs: dict, default_key: str, first, second) -> dict:
        diff = (evs[first].edited - evs[second].edited).abs()
        return {"steps": n, "default": default_key,
                **{k.value: {m: v for m, v in e.summary().items() if m in TABLE_KEYS}
                   for k, e in evs.items()},
                "difference": {"mean": float(diff.mean()), "max": float(diff.max())}}

    for name, rect in edits.items():
        attr = cfg.edits.attributes.get(name)
        if attr is None:
            log.warning("models/edits/%s has no entry in edits.attributes: not evaluated", name)
            continue
        direction = DirectionalClipLoss(clip, attr.source, attr.target)

        def run(n: int, m: EditMode, c: Conditioning):
            editor = Editor(denoiser, replace(cfg.inversion, num_steps=n, mode=m), {name: rect})
            return evaluate_edit(editor, name, images, seeds, direction, scorer,
                                 batch_size=cfg.runtime.eval_batch_size, identity_note=note,
                                 condition=c)

        for n in (int(n) for n in cfg.evaluate.steps):
            evs = {c: run(n, mode, c) for c in Conditioning}
            ev = evs[default]
            results.setdefault(name, []).append({"steps": n, "mode": mode.value, **ev.summary()})
            edited.setdefault(name, []).append((n, ev.edited))
            compared.setdefault(name, []).append(side_by_side(
                n, evs, default.value, Conditioning.trajectory, Conditioning.live))
            by_mode = {mode: ev, other: run(n, other, default)}
            modes.setdefault(name, []).append(side_by_side(
                n, by_mode, mode.value, EditMode.edit_friendly, EditMode.ddim))
    return results, edited, compared, modes


def evaluate_sdedit(cfg: HfeditConfig, denoiser, rectifier, images, n: int) -> list[dict]:
    """The paper's Fig. 7: SDEdit (:meth:`hfedit.editing.editor.Editor.translate`) of every image at each
    ``evaluate.sdedit_strengths`` in N steps, through the backbone alone and through the
    reconstruction rectifier conditioned on the source, with the same noise (image i seeded
    ``inversion.seed + i``). Rows ``{strength, steps, backbone: {...}, rectifier: {...},
    difference: {mean, max}}``: L1 / SSIM / PSNR of the result to its source, mean ± std."""
    from hfedit.evaluation import metrics as M
    from hfedit.editing.editor import Editor
    from hfedit.evaluation.reconstruction import mean_std

    seeds = [cfg.inversion.seed + i for i in range(images.shape[0])]
    inv = replace(cfg.inversion, num_steps=n)
    editors = {"backbone": Editor(denoiser, inv),
               "rectifier": Editor(denoiser, inv, reconstruction_rectifier=rectifier)}
    bs = cfg.runtime.eval_batch_size
    rows = []
    for strength in cfg.evaluate.sdedit_strengths:
        outs = {}
        for model, editor in editors.items():
            outs[model] = torch.cat([
                editor.translate(images[i: i + bs].to(denoiser.device), seeds[i: i + bs],
                                 float(strength)).float().cpu().clamp(-1, 1)
                for i in range(0, images.shape[0], bs)])
        row: dict[str, Any] = {"strength": float(strength), "steps": n}
        for model, out in outs.items():
            row[model] = {}
            for k, fn in (("l1", M.l1), ("ssim", M.ssim), ("psnr", M.psnr)):
                st = mean_std(fn(images, out))
                row[model].update({k: st["mean"], f"{k}_std": st["std"], "images": st["images"]})
        diff = (outs["rectifier"] - outs["backbone"]).abs()
        row["difference"] = {"mean": float(diff.mean()), "max": float(diff.max())}
        rows.append(row)
    return rows


def batch_summary(batch: Path) -> dict[str, Any]:
    """Per attribute of the ``edit_batch`` run in ``batch`` (its manifest): ok / failed counts,
    failure reasons, mean L1 and SSIM of the ok rows (None where there are none)."""
    if not (batch / "manifest.parquet").is_file():
        return {"note": f"{batch / 'manifest.parquet'} not found: run the edit_batch stage"}
    from pipelines.edit_batch import read_manifest

    def mean(values) -> Optional[float]:
        m = values.mean()  # NaN (SSIM of tiny images) skipped
        return None if m != m else float(m)

    out: dict[str, Any] = {}
    for name, rows in read_manifest(batch).groupby("attribute"):
        ok, bad = rows[rows.status == "ok"], rows[rows.status != "ok"]
        out[str(name)] = {"ok": len(ok), "failed": len(bad), "l1": mean(ok.l1), "ssim": mean(ok.ssim),
                          "reasons": {str(k): int(v) for k, v in bad.reason.value_counts().items()}}
    return out


# ------------------------------------------------------------------------------- writing
def write_reconstruction_csv(rows: list[dict], path: Path) -> list[str]:
    """Wide CSV, one row per N: ``<model>_<inversion>_<metric>`` columns. Returns the columns."""
    metrics = [k for k in rows[0] if k not in ("steps", "model", "inversion")]
    by_n: dict[int, dict[str, float]] = {}
    for r in rows:
        for k in metrics:
            by_n.setdefault(r["steps"], {})[f"{r['model']}_{r['inversion']}_{k}"] = r[k]
    columns = ["steps"] + sorted({c for v in by_n.values() for c in v})
    atomic_write_csv(path, columns, ([n] + [by_n[n].get(c, "") for c in columns[1:]]
                                     for n in sorted(by_n)))
    return columns


def write_editing_csvs(results: dict[str, list], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_n in results.items():
        keys = ["steps", "clip_direction", "l1", "ssim", "psnr", "identity"]
        atomic_write_csv(folder / f"{name}.csv", keys,
                         (["" if r.get(k) is None else r.get(k) for k in keys] for r in per_n))


def plot_reconstruction(rows: list[dict], gap: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for model in ("backbone", "rectifier"):
        for inv, style in (("ddim", "-o"), ("edit_friendly", "--s")):
            pts = [(r["steps"], r["l1"]) for r in rows if r["model"] == model and r["inversion"] == inv]
            if pts:
                xs, ys = zip(*pts)
                axes[0].plot(xs, ys, style, label=f"{model}, {inv.replace('_', '-')}")
    axes[0].set_xlabel("inversion + sampling steps N")
    axes[0].set_ylabel("L1 to the source")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].legend(fontsize=7)
    axes[0].set_title("reconstruction (held out)")
    names = list(gap)
    axes[1].bar(names, [gap[n] for n in names], color=["tab:gray", "tab:blue"][: len(names)])
    axes[1].set_title("posterior gap ||eps - eps_model||^2")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_editing(results: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, per_n in results.items():
        xs = [r["steps"] for r in per_n]
        axes[0].plot(xs, [r["clip_direction"] for r in per_n], "-o", label=name)
        axes[1].plot(xs, [r["l1"] for r in per_n], "-o", label=name)
    axes[0].set_title("edit strength: directional CLIP similarity")
    axes[1].set_title("fidelity: L1 to the source")
    for ax in axes:
        ax.set_xlabel("inversion + sampling steps N")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def pm(r: dict, key: str, fmt: str = ".4f", sign: str = "") -> str:
    """``mean ± std`` of ``r[key]`` (std from ``r[key + '_std']``; "n/a" when missing)."""
    v = r.get(key)
    if v is None or v != v:
        return "n/a"
    sd = r.get(f"{key}_std")
    return f"{v:{sign}{fmt}}" + ("" if sd is None or sd != sd else f" ± {sd:{fmt}}")


def results_markdown(report: dict[str, Any]) -> str:
    """The README's results table: this run beside the paper's numbers; every value is the
    mean ± standard deviation over the images, whose count every table names."""
    rec = report["reconstruction"]
    n = report["headline_steps"]
    count = report["images"]
    row = {(r["model"], r["inversion"]): r for r in rec["rows"] if r["steps"] == n}
    pmg = {r["model"]: r for r in rec.get("posterior_mean_gap", []) if r["steps"] == n}
    lines = [
        f"Held-out reconstruction, {count} val images, N = {n} (DDIM inversion + "
        "sampling, as the paper's Table 1; edit-friendly inversion beside it); mean ± std over "
        "the images. Noise gap: ||eps - eps_model||^2 at evenly spaced t; posterior-mean gap: "
        "PDAE's ||mu~ - mu_theta||^2 along the N-step chain:",
        "",
        "| model | images | L1 (DDIM) | PSNR (DDIM) | SSIM (DDIM) | noise gap | posterior-mean gap "
        "| max error (edit-friendly) | paper L1 (DDIM) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in ("backbone", "rectifier"):
        d, e = row.get((model, "ddim")), row.get((model, "edit_friendly"))
        if d is None:
            continue
        gap = {"gap": rec["gap"].get(model), "gap_std": rec.get("gap_std", {}).get(model)}
        g = pmg.get(model, {})
        mean_gap = {"v": g.get("mean"), "v_std": g.get("std")}
        lines.append(f"| {model} | {d.get('images', count)} | {pm(d, 'l1')} | {pm(d, 'psnr', '.2f')} | "
                     f"{pm(d, 'ssim')} | {pm(gap, 'gap', '.5f')} | {pm(mean_gap, 'v', '.2e')} | "
                     f"{e['max_error']:.1e} | {PAPER_L1[model]:.3f} |")
    if report.get("editing"):
        lines += ["", f"Editing, same images, N = {n}, mode {report.get('mode', 'edit_friendly')} "
                  f"(CLIP: {report['clip']['model']}, "
                  f"{'semantic' if report['clip']['semantic'] else 'random weights: not semantic'}); "
                  "mean ± std, identity over the images with a face found:",
                  "", "| attribute | images | CLIP direction | L1 to source | SSIM | identity (scored) |",
                  "|---|---|---|---|---|---|"]
        for name, per_n in report["editing"].items():
            r = next((x for x in per_n if x["steps"] == n), per_n[-1])
            ident = ("n/a" if r.get("identity") is None else
                     f"{pm(r, 'identity', '.3f')} ({r.get('identity_scored', 0)})")
            lines.append(f"| {name} | {r.get('images', count)} | {pm(r, 'clip_direction', '.4f', '+')} | "
                         f"{pm(r, 'l1')} | {pm(r, 'ssim')} | {ident} |")
    for key, title, first, second in (
            ("modes", "Edit protocol (`inversion.mode`): edit-friendly replay vs DDIM inversion + "
             "sampling", "edit_friendly", "ddim"),
            ("conditioning", "Conditioning of the rectifier during the replay "
             "(`inversion.condition`)", "trajectory", "live")):
        if not report.get(key):
            continue
        lines += ["", f"{title}, same images and attributes, N = {n}; mean ± std over the images; "
                  f"difference = |{first} - {second}| of the edited images:", "",
                  f"| attribute | {key.rstrip('s') if key == 'modes' else key} | images | "
                  "CLIP direction | L1 to source | SSIM | PSNR | difference mean / max |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, per_n in report[key].items():
            r = next((x for x in per_n if x["steps"] == n), per_n[-1])
            for c in (first, second):
                m = r[c]
                mark = " (default)" if c == r["default"] else ""
                diff = (f"{r['difference']['mean']:.1e} / {r['difference']['max']:.1e}"
                        if c == first else "")
                lines.append(f"| {name} | {c}{mark} | {m.get('images', count)} | "
                             f"{pm(m, 'clip_direction', '.4f', '+')} | {pm(m, 'l1')} | "
                             f"{pm(m, 'ssim')} | {pm(m, 'psnr', '.2f')} | {diff} |")
    if report.get("sdedit"):
        lines += ["", "SDEdit (the paper's Fig. 7): noise to strength x T, sampled down in N = "
                  f"{report['sdedit'][0]['steps']} steps, the same noise with and without the "
                  "reconstruction rectifier; distance of the result to its source, mean ± std; "
                  "difference = |with - without|:", "",
                  "| strength | model | images | L1 to source | SSIM | PSNR | difference mean / max |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["sdedit"]:
            for model in ("backbone", "rectifier"):
                m = r[model]
                diff = (f"{r['difference']['mean']:.1e} / {r['difference']['max']:.1e}"
                        if model == "rectifier" else "")
                lines.append(f"| {r['strength']:g} | {model} | {m['images']} | {pm(m, 'l1')} | "
                             f"{pm(m, 'ssim')} | {pm(m, 'psnr', '.2f')} | {diff} |")
    ab = report.get("ablation") or {}
    if ab.get("enabled") and "score_matching" in ab and "markovian" in ab:
        from pipelines.edit_ablation import ablation_markdown

        lines += ["", *ablation_markdown(ab)]
    lines += ["", f"Machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The results table's numbers at the headline N, named ``evaluate/<group>/<metric>``: the
    pipeline run's overview in MLflow and, nested at the slashes, ``<out>/metrics.json`` (what
    ``dvc metrics show`` / ``dvc exp show`` tabulate: numbers only, means only; the standard
    deviations, every N, notes and the machine are in ``<out>/report.json``)."""
    n = report["headline_steps"]
    out: dict[str, float] = {"evaluate/images": report["images"], "evaluate/steps": n}
    for r in report["reconstruction"]["rows"]:
        if r["steps"] == n:
            for k in ("l1", "ssim", "psnr"):
                out[f"evaluate/reconstruction/{r['model']}_{r['inversion']}/{k}"] = r[k]
    for model, gap in report["reconstruction"]["gap"].items():
        out[f"evaluate/reconstruction/{model}/gap"] = gap
    for r in report["reconstruction"]["posterior_mean_gap"]:
        if r["steps"] == n:
            out[f"evaluate/reconstruction/{r['model']}/posterior_mean_gap"] = r["mean"]
    for name, per_n in (report.get("editing") or {}).items():
        r = next((x for x in per_n if x["steps"] == n), per_n[-1])
        for k in ("clip_direction", "l1", "ssim", "identity"):
            out[f"evaluate/editing/{name}/{k}"] = r.get(k)
    for key, sides in (("conditioning", ("trajectory", "live")),
                       ("modes", ("edit_friendly", "ddim"))):
        for name, per_n in (report.get(key) or {}).items():
            r = next((x for x in per_n if x["steps"] == n), per_n[-1])
            for side in sides:
                for k in ("clip_direction", "l1"):
                    out[f"evaluate/{key}/{name}/{side}/{k}"] = r[side].get(k)
            out[f"evaluate/{key}/{name}/difference_max"] = r["difference"]["max"]
    for r in report.get("sdedit") or []:
        for model in ("backbone", "rectifier"):
            for k in ("l1", "ssim"):
                out[f"evaluate/sdedit/s{r['strength']:g}/{model}/{k}"] = r[model][k]
    for name, b in (report.get("batch") or {}).items():
        if isinstance(b, dict):
            out[f"evaluate/batch/{name}/ok"] = b["ok"]
            out[f"evaluate/batch/{name}/failed"] = b["failed"]
    return {k: float(v) for k, v in out.items() if finite(v)}


def per_n_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Every N's numbers for the stage's MLflow run, N in the name (``.../n50/l1``), not on the
    step axis (which is the training step everywhere in hfedit)."""
    out: dict[str, Any] = {}
    for r in report["reconstruction"]["rows"]:
        for k, v in r.items():
            out[f"evaluate/reconstruction/{r['model']}_{r['inversion']}/n{r['steps']}/{k}"] = v
    for r in report["reconstruction"]["posterior_mean_gap"]:
        out[f"evaluate/reconstruction/{r['model']}/n{r['steps']}/posterior_mean_gap"] = r["mean"]
    for name, per_n in (report.get("editing") or {}).items():
        for r in per_n:
            out.update({f"evaluate/editing/{name}/n{r['steps']}/{k}": v for k, v in r.items()
                        if k != "steps"})
    for key, sides in (("conditioning", ("trajectory", "live")),
                       ("modes", ("edit_friendly", "ddim"))):
        for name, per_n in (report.get(key) or {}).items():
            for r in per_n:
                out.update({f"evaluate/{key}/{name}/n{r['steps']}/{c}/{k}": v
                            for c in (*sides, "difference") for k, v in r[c].items()})
    return {k: float(v) for k, v in out.items() if finite(v)}


def machine() -> str:
    """What ran the evaluation, for the results table: CPU model, cores, memory, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}, {torch.get_num_threads()} torch threads"


# ------------------------------------------------------------------------------- the stage
def run(cfg: HfeditConfig, backbone: Path, rectifier_dir: Path, edits_dir: Path, data: Path,
        batch: Path, ablation: Path, out: Path, tracker=None) -> dict[str, Any]:
    from hfedit.models.backbone import load_backbone
    from hfedit.models.checkpoint import load_rectifier
    from hfedit.models.clip import RandomClipWarning, load_clip
    from hfedit.data.grids import make_grid_png
    from hfedit.editing.editor import load_edit_rectifiers

    if not cfg.evaluate.steps or any(int(n) < 1 for n in cfg.evaluate.steps):
        raise ConfigError(f"evaluate.steps={list(cfg.evaluate.steps)}: give step counts >= 1")
    started = time.perf_counter()
    torch.manual_seed(0)
    device, precision = placement(cfg.runtime.device, cfg.runtime.precision, "evaluation")
    denoiser = load_backbone(backbone, device, precision)
    rectifier, _ = load_rectifier(rectifier_dir, denoiser.unet, device=str(device))
    images = held_out(cfg, data)  # on the CPU; every evaluation moves one batch at a time
    steps = sorted(int(n) for n in cfg.evaluate.steps)
    head = cfg.inversion.num_steps if cfg.inversion.num_steps in steps else steps[len(steps) // 2]
    report: dict[str, Any] = {
        "images": int(images.shape[0]), "resolution": int(images.shape[-1]), "steps": steps,
        "headline_steps": head, "inversion": {"eta": cfg.inversion.eta, "seed": cfg.inversion.seed},
        "mode": cfg.inversion.mode.value,
        "machine": machine(), "device": str(device), "precision": precision.value,
    }
    log.info("evaluate: reconstruction at N=%s on %d images", steps, images.shape[0])
    report["reconstruction"] = evaluate_reconstruction(cfg, denoiser, rectifier, images)
    log.info("evaluate: SDEdit at strengths %s, N=%d", list(cfg.evaluate.sdedit_strengths), head)
    report["sdedit"] = evaluate_sdedit(cfg, denoiser, rectifier, images, head)

    edits = (load_edit_rectifiers(edits_dir, denoiser.unet, device=device)
             if edits_dir.is_dir() else {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomClipWarning)
        clip = load_clip(cfg.clip, device)
    report["clip"] = {"model": clip.name, "weights": cfg.clip.weights, "semantic": clip.semantic}
    if not clip.semantic:
        from pipelines.train_edits import NOT_SEMANTIC

        report["clip"]["note"] = NOT_SEMANTIC
    log.info("evaluate: editing %s", sorted(edits))
    (report["editing"], edited, report["conditioning"],
     report["modes"]) = evaluate_edits(cfg, denoiser, edits, clip, images)
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
    k = min(GRID_IMAGES, images.shape[0])  # the scores use every image; a grid shows the first k
    for name, per_n in edited.items():
        grid = torch.cat([images[:k]] + [e[:k] for _, e in per_n])  # rows: source, edit at each N
        make_grid_png(grid, out / "grids" / f"{name}.png", nrow=k,
                      row_labels=["source"] + [f"{name}, N={n}" for n, _ in per_n])
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "results.md", results_markdown(report))
    atomic_write_json(out / "report.json", report)
    headline = summary_metrics(report)
    atomic_write_json(out / "metrics.json", nest_metrics(headline, STAGE))

    if tracker is not None:
        tracker.log_metrics({**per_n_metrics(report), **headline}, step=0)
        tracker.log_artifacts(out, "eval")
        parent = tracker.parent()
        if parent is not None:
            parent.log_metrics(headline, step=0)
            parent.log_artifact(out / "results.md", "eval")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Evaluate reconstruction and editing (DVC stage).")
    parser.add_argument("--backbone", type=Path, default=Path("models/backbone"))
    parser.add_argument("--rectifier", type=Path, default=Path("models/rectifier"))
    parser.add_argument("--edits", type=Path, default=Path("models/edits"))
    parser.add_argument("--data", type=data_location, default=data_location("data/prepared"),
                        help="prepared folder: a path, or a URI every node sees (s3://, file://)")
    parser.add_argument("--batch", type=Path, default=Path("outputs/val"))
    parser.add_argument("--ablation", type=Path, default=Path("plots/edit_ablation/report.json"),
                        help="the edit_ablation stage's report")
    parser.add_argument("--out", type=Path, default=Path("eval"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hfedit").setLevel(logging.INFO)
    cfg = load_config(overrides=args.overrides)
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    from pipelines.tracking import stage_run

    with stage_run(cfg, STAGE) as tracker:
        report = run(cfg, args.backbone, args.rectifier, args.edits, args.data, args.batch,
                     args.ablation, args.out, tracker)
    print((args.out / "results.md").read_text())
    if not report["reconstruction"]["lpips"]:
        print(f"evaluate: LPIPS not computed: {report['reconstruction']['lpips_note']}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError, FileNotFoundError, KeyError, DeviceUnavailable) as err:
        sys.exit(f"evaluate: {err}")
