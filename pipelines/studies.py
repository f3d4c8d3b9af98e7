"""The paper's studies as DVC experiments: run them, then tabulate and plot what they measured.

    python pipelines/studies.py list
    python pipelines/studies.py run lambda_sweep      # dvc exp run --temp -n ... -S ..., one by one
    python pipelines/studies.py queue lambda_sweep    # the same as queued experiments: then
    dvc queue start -j 1                              #   (dvc queue status / logs)
    python pipelines/studies.py report lambda_sweep   # studies/lambda_sweep.md and .png

Each study is a set of named experiments, each a list of ``-S key=value`` overrides of the
committed baseline (``params.yaml`` + the profile): DVC reruns only the stages whose params
changed, from the cache (``evaluate.steps`` reruns ``evaluate`` alone; a pretraining loss reruns
everything after ``backbone``). ``run`` uses ``dvc exp run --temp`` (each experiment in its own
temporary copy of the baseline, one at a time, without the queue's worker), ``queue`` stages
them for ``dvc queue start``; both name the experiments ``<study>-<name>``, so ``dvc exp show``
lists them and ``dvc exp apply <study>-<name>`` brings one into the workspace. ``report`` reads
``dvc exp show --json`` (the metrics files of each experiment and of the baseline commit) and,
for the step-count study, the per-N CSVs that ``evaluate`` commits, and writes a markdown table
and a plot per study. MLflow: the experiments log to this checkout's store (MLFLOW_TRACKING_URI
is set to it unless given), so their runs sit beside the baseline's in the UI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
COMMITS = 5  # how far back `report` looks for a study's experiments (`dvc exp show -n`)


@dataclass(frozen=True)
class Column:
    """One column of a study's table: a metric's path in a metrics file (slashes = nesting; the
    files hold the MLflow names without the stage's prefix, ``pipelines.tracking.nest_metrics``)."""

    title: str
    file: str
    path: str
    fmt: str = ".4f"


@dataclass(frozen=True)
class Study:
    paper: str
    what: str
    experiments: dict[str, tuple[str, ...]]
    columns: tuple[Column, ...]
    # per-N results from the CSVs evaluate commits (the step-count study), not from metrics
    per_n: bool = False
    baseline: bool = True  # a row for the committed baseline (its own values of the keys)
    keys: tuple[str, ...] = field(default=())


EVAL = "eval/metrics.json"
ABL = "metrics/edit_ablation.json"
PRE = "metrics/pretrain_rectifier.json"
RECON = (
    Column("rectifier DDIM L1", EVAL, "reconstruction/rectifier_ddim/l1"),
    Column("backbone DDIM L1", EVAL, "reconstruction/backbone_ddim/l1"),
    Column("rectifier noise gap", EVAL, "reconstruction/rectifier/gap", ".5f"),
    Column("backbone noise gap", EVAL, "reconstruction/backbone/gap", ".5f"),
    Column("rectifier posterior-mean gap", EVAL,
           "reconstruction/rectifier/posterior_mean_gap", ".3e"),
)


def edit_columns(attribute: str) -> tuple[Column, ...]:
    return (
        Column(f"{attribute} CLIP direction", EVAL, f"editing/{attribute}/clip_direction", "+.4f"),
        Column(f"{attribute} L1 to source", EVAL, f"editing/{attribute}/l1"),
        Column(f"{attribute} SSIM", EVAL, f"editing/{attribute}/ssim"),
    )


def ablation_columns(*which: str) -> tuple[Column, ...]:
    """Columns of ``metrics/edit_ablation.json`` (own interval): ``"<method> <clip|l1>"``."""
    fmt = {"clip": ("CLIP", "clip_direction", "+.4f"), "l1": ("L1", "l1", ".4f")}
    label = {"score_matching": "score matching", "markovian": "Markovian"}
    out = []
    for w in which:
        method, metric = w.split()
        title, key, f = fmt[metric]
        out.append(Column(f"ablation {label[method]} {title}", ABL, f"{method}/own/{key}", f))
    return tuple(out)


def _grid(key: str, values: list[str]) -> dict[str, tuple[str, ...]]:
    return {v.replace(".", "p"): (f"{key}={v}",) for v in values}


STUDIES: dict[str, Study] = {
    "steps": Study(
        "Fig. 1, App. F", "reconstruction and editing at N = 50 / 200 / 1000 (evaluate reruns alone)",
        {"n50-200-1000": ("evaluate.steps=[50,200,1000]",)}, (), per_n=True),
    "sdedit": Study(
        "Fig. 7", "SDEdit with vs without the reconstruction rectifier, at five strengths "
        "(evaluate reruns alone; every evaluate run reports strengths 0.3 and 0.5)",
        {"strengths": ("evaluate.sdedit_strengths=[0.1,0.3,0.5,0.7,0.9]",)},
        tuple(Column(f"s={s} {m} {k}", EVAL, f"sdedit/s{s}/{m}/{k}")
              for s in ("0.1", "0.3", "0.5", "0.7", "0.9") for m in ("backbone", "rectifier")
              for k in ("l1",)), baseline=False),
    "loss": Study(
        "App. C (Fig. 10)", "reconstruction loss: noise fitting (eq. 3) vs L1 vs L1 + dw",
        _grid("pretrain.loss", ["l1", "l1_dw"]),  # noise (eq. 3) is the baseline's
        RECON + edit_columns("smiling"), keys=("pretrain.loss",)),
    "lambda_sweep": Study(
        "App. D (Fig. 11)", "lambda_clip and lambda_recon of the smiling edit (train_edits retrains "
        "smiling alone)",
        {**{f"clip{v.replace('.', 'p')}": (f"edits.attributes.smiling.lambda_clip={v}",)
            for v in ("0.5", "2.0")},
         **{f"recon{v.replace('.', 'p')}": (f"edits.attributes.smiling.lambda_recon={v}",)
            for v in ("0.5", "2.0")}},
        edit_columns("smiling") + ablation_columns("score_matching clip", "score_matching l1"),
        keys=("edits.attributes.smiling.lambda_clip", "edits.attributes.smiling.lambda_recon")),
    "large_t": Study(
        "(this project)", "Algorithm 1 at large t: the smiling edit trained with each remedy",
        {**_grid("edits.attributes.smiling.large_t", ["none", "clamp", "weight"]),
         "range500": ("edits.attributes.smiling.large_t=range", "edits.attributes.smiling.t_max=500")},
        edit_columns("smiling") + ablation_columns("score_matching clip", "score_matching l1"),
        keys=("edits.attributes.smiling.large_t",)),
    "seeds": Study(
        "(this project)", "run-to-run spread of an edit: the smiling edit retrained with other "
        "seeds, everything before train_edits unchanged (the studies above are one run each)",
        _grid("edits.attributes.smiling.seed", ["1", "2", "3"]),
        edit_columns("smiling") + ablation_columns("score_matching clip", "markovian clip",
                                                   "markovian l1"),
        keys=("edits.attributes.smiling.seed",)),
    "weight_seeds": Study(
        "(this project)", "large_t: weight over the four seeds of the study seeds (whose rows are "
        "clamp, the default), the smiling edit retrained",
        {f"s{k}": ("edits.attributes.smiling.large_t=weight", f"edits.attributes.smiling.seed={k}")
         for k in range(4)},
        edit_columns("smiling"),
        baseline=False, keys=("edits.attributes.smiling.large_t", "edits.attributes.smiling.seed")),
}


# ----------------------------------------------------------------------------------- running
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    return env


def experiment_commands(name: str, queue: bool) -> list[list[str]]:
    study = STUDIES[name]
    cmds = []
    for exp, sets in study.experiments.items():
        cmd = ["dvc", "exp", "run", "--queue" if queue else "--temp", "-n", f"{name}-{exp}"]
        for s in sets:
            cmd += ["-S", s]
        cmds.append(cmd)
    return cmds


def run_study(name: str, queue: bool) -> int:
    for cmd in experiment_commands(name, queue):
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=_env())
        if rc:
            print(f"studies: {' '.join(cmd)} failed (exit {rc}); the others still run",
                  file=sys.stderr)
    if queue:
        print("queued: start them with `dvc queue start -j 1`, follow with `dvc queue status`")
    return 0


# --------------------------------------------------------------------------------- reporting
@dataclass
class Row:
    name: str
    rev: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def _get(tree: dict, path: str) -> Any:
    for part in path.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _param(params: dict, key: str) -> Any:
    return _get(params, key.replace(".", "/"))


def _row(rec: dict) -> Row:
    data = rec.get("data") or {}
    params = {k: (v or {}).get("data", {}) for k, v in (data.get("params") or {}).items()}
    metrics = {k: (v or {}).get("data", {}) for k, v in (data.get("metrics") or {}).items()}
    return Row(rec.get("name") or rec["rev"], rec["rev"], params.get("params.yaml", {}), metrics)


def experiments(show: Optional[list] = None, study: str = "") -> tuple[Optional[Row], list[Row]]:
    """``(baseline commit, its experiments)`` from ``dvc exp show --json`` over the last
    ``COMMITS`` commits: a list of the workspace and the commits, each commit with
    ``experiments`` (each ``revs``). The baseline is the newest commit holding experiments of
    ``study`` (an experiment runs from the commit checked out when it started), else HEAD."""
    if show is None:
        out = subprocess.run(["dvc", "exp", "show", "--json", "-n", str(COMMITS)], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, check=True).stdout
        show = json.loads(out)
    tops = []
    for top in show:
        if top.get("rev") == "workspace":
            continue
        rows = [_row(rec) for exp in top.get("experiments") or []
                for rec in (exp.get("revs") or [exp]) if rec.get("data")]
        tops.append((_row(top), rows))
    if not tops:
        return None, []
    for baseline, rows in tops:
        if any(r.name.startswith(f"{study}-") for r in rows):
            return baseline, rows
    return tops[0]


def _fmt(v: Any, fmt: str) -> str:
    return "n/a" if not isinstance(v, (int, float)) or v != v else format(v, fmt)


def _shown(name: str, baseline: Optional[Row], rows: list[Row]) -> list[tuple[str, Row]]:
    """``(label, row)`` of the study's table and plot: the baseline (when the study shows it),
    then each experiment ``<name>-<label>``."""
    first = [("baseline", baseline)] if STUDIES[name].baseline and baseline else []
    return first + [(r.name[len(name) + 1:], r) for r in rows if r.name.startswith(f"{name}-")]


def study_table(name: str, baseline: Optional[Row], rows: list[Row]) -> list[str]:
    study = STUDIES[name]
    shown = _shown(name, baseline, rows)
    keys = list(study.keys) or sorted({s.split("=", 1)[0] for sets in study.experiments.values()
                                       for s in sets})
    head = ["experiment", *keys, *(c.title for c in study.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in shown:
        vals = [str(_param(r.params, k)) for k in keys]
        vals += [_fmt(_get(r.metrics.get(c.file, {}), c.path), c.fmt) for c in study.columns]
        lines.append("| " + " | ".join([label, *vals]) + " |")
    return lines


def _git_show(rev: str, path: str) -> Optional[str]:
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def per_n_table(name: str, rows: list[Row]) -> tuple[list[str], list[dict]]:
    """The step-count study: per N, reconstruction L1 (both inversions, both models) and each
    attribute's edit, from the CSVs the experiment's ``evaluate`` committed."""
    lines, points = [], []
    for r in (r for r in rows if r.name.startswith(f"{name}-")):
        rec = _git_show(r.rev, "eval/reconstruction.csv")
        if rec is None:
            continue
        recs = list(csv.DictReader(io.StringIO(rec)))
        attrs = sorted(_param(r.params, "edits.attributes") or {})
        edits = {a: {int(float(x["steps"])): x for x in csv.DictReader(io.StringIO(
            _git_show(r.rev, f"eval/editing/{a}.csv") or ""))} for a in attrs}
        head = ["N", "backbone DDIM L1", "rectifier DDIM L1", "rectifier edit-friendly max error",
                *(f"{a}: CLIP direction / L1 / SSIM" for a in attrs)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for x in recs:
            n = int(float(x["steps"]))
            cells = [str(n), _fmt(float(x["backbone_ddim_l1"]), ".4f"),
                     _fmt(float(x["rectifier_ddim_l1"]), ".4f"),
                     _fmt(float(x.get("rectifier_edit_friendly_max_error", "nan")), ".1e")]
            for a in attrs:
                e = edits[a].get(n)
                cells.append("n/a" if e is None else
                             f"{float(e['clip_direction']):+.4f} / {float(e['l1']):.4f} / "
                             f"{float(e['ssim']):.4f}")
                if e is not None:
                    points.append({"n": n, "attribute": a, "clip_direction": float(e["clip_direction"]),
                                   "l1": float(e["l1"])})
            points.append({"n": n, "attribute": "reconstruction (rectifier DDIM)",
                           "l1": float(x["rectifier_ddim_l1"])})
            lines.append("| " + " | ".join(cells) + " |")
    return lines, points


def plot(name: str, baseline: Optional[Row], rows: list[Row], points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = STUDIES[name]
    fig, ax = plt.subplots(figsize=(7, 4))
    if study.per_n:
        for attr in sorted({p["attribute"] for p in points}):
            pts = sorted((p["n"], p["l1"]) for p in points if p["attribute"] == attr)
            ax.plot(*zip(*pts), marker="o", label=attr)
        ax.set_xscale("log")
        ax.set_xlabel("N (inversion + sampling steps)")
        ax.set_ylabel("L1 to the source")
    else:
        mine = _shown(name, baseline, rows)
        cols = [c for c in study.columns if "l1" in c.title.lower()][:10]
        width = 0.8 / max(1, len(cols))
        for k, c in enumerate(cols):
            vals = [_get(r.metrics.get(c.file, {}), c.path) for _, r in mine]
            ax.bar([i + k * width for i in range(len(mine))],
                   [v if isinstance(v, (int, float)) else 0.0 for v in vals], width, label=c.title)
        ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(mine))],
                      [label for label, _ in mine], rotation=20)
        ax.set_ylabel("L1 to the source")
    ax.set_title(f"{study.paper}: {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(name: str, out: Path, show: Optional[list] = None) -> str:
    study = STUDIES[name]
    baseline, rows = experiments(show, name)
    if study.per_n:
        table, points = per_n_table(name, rows)
    else:
        table, points = study_table(name, baseline, rows), []
    found = sum(r.name.startswith(f"{name}-") for r in rows)
    text = "\n".join([
        f"# Study `{name}` ({study.paper}): {study.what}", "",
        f"{found} of {len(study.experiments)} experiments found in `dvc exp show`"
        + (f", beside the baseline commit {baseline.rev[:7]}" if baseline else "") + ".",
        "Commands: `python pipelines/studies.py run " + name + "` (or `queue` then "
        "`dvc queue start -j 1`), then `python pipelines/studies.py report " + name + "`.", "",
        *(table or ["(no experiment of this study yet)"]), ""])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    if found:
        plot(name, baseline, rows, points, out / f"{name}.png")
    return text


def main(argv: Optional[list[str]] = None) -> int:
    global ROOT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the DVC project (this checkout)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    for cmd in ("run", "queue", "report"):
        s = sub.add_parser(cmd)
        s.add_argument("study", choices=sorted(STUDIES))
        if cmd == "report":
            s.add_argument("--out", type=Path, help="default: <root>/studies")
    args = p.parse_args(argv)
    ROOT = args.root.resolve()
    if args.cmd == "list":
        for name, s in STUDIES.items():
            print(f"{name:13s} {s.paper}: {s.what}")
            for cmd in experiment_commands(name, queue=False):
                print("   ", " ".join(cmd))
        return 0
    if args.cmd in ("run", "queue"):
        return run_study(args.study, args.cmd == "queue")
    print(report(args.study, args.out or ROOT / "studies"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
