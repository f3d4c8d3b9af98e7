"""The evaluate stage's report as text and numbers: the results table (``results.md``, the
docs/results.md's), the ablation's table in it, and the metric names MLflow and DVC show.

A report is the JSON-able dict the ``evaluate`` stage builds from
:mod:`hfedit.evaluation.comparisons` (``images``, ``headline_steps``, ``reconstruction``,
``editing``, ``conditioning``, ``modes``, ``sdedit``, ``ablation``, ``batch``, ``clip``,
``machine``, ...). Every value in a table is ``mean ± std`` over the images
(:func:`mean_std_text`), and every table names its image count.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The paper's Table 1 (CelebA-HQ 256, DDIM inversion + sampling): L1 without / with the rectifier.
PAPER_L1 = {"backbone": 0.090, "rectifier": 0.085}
# The edit_ablation report's entry for the reconstruction rectifier (the no-edit reference).
ABLATION_REFERENCE = "reconstruction_rectifier"


def mean_std_text(r: dict, key: str, fmt: str = ".4f", sign: str = "") -> str:
    """``mean ± std`` of ``r[key]`` (std from ``r[key + '_std']``), formatted with ``fmt``
    (``sign``: "+" to sign the mean); "n/a" when the mean is missing, None or NaN, the mean
    alone when the std is."""
    v = r.get(key)
    if v is None or v != v:
        return "n/a"
    sd = r.get(f"{key}_std")
    return f"{v:{sign}{fmt}}" + ("" if sd is None or sd != sd else f" ± {sd:{fmt}}")


def _at(per_n: list[dict], n: int) -> dict:
    """The row of step count ``n``, else the last one."""
    return next((x for x in per_n if x["steps"] == n), per_n[-1])


def ablation_markdown(ab: dict) -> list[str]:
    """The edit_ablation stage's table (its ``report.json``): every method on its own and the
    full interval, the backbone alone, the reconstruction rectifier; mean ± std over the images."""
    pm = mean_std_text
    lines = [f"Edit training, score matching vs Markovian ({ab['attribute']}, {ab['steps']} "
             "steps each), each on its own interval and on the full one (Fig. 6), beside the "
             "backbone alone; mean ± std over the images:", "",
             "| method | interval | images | CLIP direction | L1 to source | SSIM |",
             "|---|---|---|---|---|---|"]
    rows = []
    for m in ("score_matching", "markovian"):
        for which, r in (ab.get(m, {}).get("intervals") or {"own": ab.get(m, {})}).items():
            rows.append((m, f"{which}: {r.get('interval', '')}", r))
    for which, r in (ab.get("backbone") or {}).items():
        rows.append(("no rectifier (backbone)", f"{which}: {r.get('interval', '')}", r))
    ref = ab.get(ABLATION_REFERENCE)
    if isinstance(ref, dict):
        rows.append(("reconstruction rectifier", ref.get("interval", ""), ref))
    for m, where, r in rows:
        if "clip_direction" in r:
            lines.append(f"| {m} | {where} | {r.get('images', '')} | "
                         f"{pm(r, 'clip_direction', '.4f', '+')} | {pm(r, 'l1')} | {pm(r, 'ssim')} |")
    return lines


def results_markdown(report: dict[str, Any]) -> str:
    """The results table (eval/results.md, linked from the README): this run beside the paper's numbers; every value is the
    mean ± standard deviation over the images, whose count every table names."""
    pm = mean_std_text
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
            r = _at(per_n, n)
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
            r = _at(per_n, n)
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
        lines += ["", *ablation_markdown(ab)]
    lines += ["", f"Machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The results table's numbers at the headline N, named ``evaluate/<group>/<metric>``: the
    pipeline run's overview in MLflow and, nested at the slashes, the stage's DVC metrics file
    (means only; the standard deviations, every N, notes and the machine are in the report).
    A value is None or NaN where it was not measured: the caller keeps what it can show."""
    n = report["headline_steps"]
    out: dict[str, Any] = {"evaluate/images": report["images"], "evaluate/steps": n}
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
        r = _at(per_n, n)
        for k in ("clip_direction", "l1", "ssim", "identity"):
            out[f"evaluate/editing/{name}/{k}"] = r.get(k)
    for key, sides in (("conditioning", ("trajectory", "live")),
                       ("modes", ("edit_friendly", "ddim"))):
        for name, per_n in (report.get(key) or {}).items():
            r = _at(per_n, n)
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
    return out


def per_n_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Every N's values, N in the name (``evaluate/<group>/.../n50/l1``), not on the step axis
    (which is the training step everywhere in hfedit); non-numbers (modes, notes) included: the
    caller keeps what it can show."""
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
    return out


def machine() -> str:
    """What ran the evaluation, for the results table: CPU model, cores, memory, GPU."""
    import torch

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
