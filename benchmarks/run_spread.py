"""The results of several `./dev run`s side by side: each stage's wall time (from the runs'
MLflow stores) and docs/results.md's tables with their spread across the runs.

    .venv/bin/python benchmarks/run_spread.py /path/to/clone-a /path/to/clone-b [...]

Each folder is a project checkout after `./dev run` (a fresh clone: its ``mlflow.db``,
``eval/report.json`` or, from commits before the report moved there, ``eval/metrics.json``).
Every number is printed as ``min - max`` over the runs, or once when the runs agree to the
printed digits; the stage times are per run. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional


def load_report(folder: Path) -> dict[str, Any]:
    for name in ("report.json", "metrics.json"):
        path = folder / "eval" / name
        if path.is_file():
            report = json.loads(path.read_text())
            if "reconstruction" in report and "rows" in report["reconstruction"]:
                return report
    raise SystemExit(f"{folder}: no eval/report.json (or full eval/metrics.json): run ./dev run there")


def stage_times(folder: Path) -> dict[str, float]:
    """Seconds per stage of the newest pipeline run in ``folder/mlflow.db``."""
    import mlflow

    db = folder / "mlflow.db"
    if not db.is_file():
        return {}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("hfedit")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], max_results=500)
    pipelines = sorted((r for r in runs if r.data.tags.get("hfedit.kind") == "pipeline"),
                       key=lambda r: r.info.start_time)
    if not pipelines:
        return {}
    pipe = pipelines[-1]
    out = {}
    for r in runs:
        stage = r.data.tags.get("hfedit.stage")
        if r.data.tags.get("mlflow.parentRunId") == pipe.info.run_id and stage and r.info.end_time:
            out[stage] = (r.info.end_time - r.info.start_time) / 1000
    if pipe.info.end_time:
        out["pipeline (first stage start to last stage end)"] = \
            (pipe.info.end_time - pipe.info.start_time) / 1000
    return out


def spread(values: list[Optional[float]], fmt: str) -> str:
    vals = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return "n/a"
    lo, hi = f"{min(vals):{fmt}}", f"{max(vals):{fmt}}"
    return lo if lo == hi else f"{lo} - {hi}"


def pick(rows: list[dict], **want) -> dict:
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), {})


def table(reports: list[dict], header: list[str],
          rows: list[tuple[tuple[str, ...], list[Callable[[dict], Any]]]],
          fmts: list[str]) -> list[str]:
    """One markdown row per (labels, cell functions): each cell's spread over the reports."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cell_fns in rows:
        values = [spread([fn(r) for r in reports], f) for fn, f in zip(cell_fns, fmts)]
        lines.append("| " + " | ".join([*label, *values]) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", type=Path, nargs="+")
    args = p.parse_args()
    reports = [load_report(f) for f in args.folders]
    n_runs = len(reports)
    print(f"{n_runs} runs: " + ", ".join(str(f) for f in args.folders) + "\n")

    times = [stage_times(f) for f in args.folders]
    stages = [s for s in ("prepare", "backbone", "pretrain_rectifier", "train_edits",
                          "edit_ablation", "edit_batch", "evaluate",
                          "pipeline (first stage start to last stage end)")
              if any(s in t for t in times)]
    if stages:
        print("| stage | " + " | ".join(f"run {i + 1}, s" for i in range(n_runs)) + " |")
        print("|---|" + "---|" * n_runs)
        for s in stages:
            print(f"| {s} | " + " | ".join(f"{t[s]:.0f}" if s in t else "" for t in times) + " |")
        print()

    steps = sorted(set(reports[0]["steps"]))
    rec_rows = []
    for n in steps:
        for model in ("backbone", "rectifier"):
            def cell(key, n=n, model=model, inv="ddim"):
                return lambda r: pick(r["reconstruction"]["rows"], steps=n, model=model,
                                      inversion=inv).get(key)
            rec_rows.append(((str(n), model), [cell("l1"), cell("psnr"), cell("ssim"),
                                               cell("max_error", inv="edit_friendly")]))
    print(f"Held-out reconstruction ({reports[0]['images']} val faces):\n")
    print("\n".join(table(reports, ["N", "model", "L1 (DDIM)", "PSNR (DDIM)", "SSIM (DDIM)",
                                    "max error, edit-friendly"], rec_rows,
                          [".4f", ".2f", ".3f", ".1e"])))
    print()
    gap_rows = [((model,), [lambda r, m=model: r["reconstruction"]["gap"].get(m),
                            lambda r, m=model: pick(r["reconstruction"].get("posterior_mean_gap", []),
                                                    model=m, steps=r["headline_steps"]).get("mean")])
                for model in ("backbone", "rectifier")]
    print("\n".join(table(reports, ["model", "noise gap (20 t)", "posterior-mean gap (headline N)"],
                          gap_rows, [".6f", ".3e"])))
    print()

    edit_rows = []
    for name in sorted(reports[0].get("editing") or {}):
        for n in steps:
            def cell(key, name=name, n=n):
                return lambda r: pick((r.get("editing") or {}).get(name, []), steps=n).get(key)
            edit_rows.append(((name, str(n)), [cell("clip_direction"), cell("l1"), cell("ssim")]))
    if edit_rows:
        print("\n".join(table(reports, ["attribute", "N", "CLIP direction", "L1 to source", "SSIM"],
                              edit_rows, ["+.4f", ".4f", ".3f"])))
        print()

    ab_rows = []
    for method in ("score_matching", "markovian"):
        for which in ("own", "full"):
            def cell(key, m=method, w=which):
                def get(r, key=key, m=m, w=w):
                    res = (r.get("ablation") or {}).get(m) or {}
                    # before the ablation had intervals it reported the own interval only
                    spans = res.get("intervals") or ({"own": res} if res else {})
                    return spans.get(w, {}).get(key)
                return get
            ab_rows.append(((method, which), [cell("clip_direction"), cell("l1"), cell("ssim")]))
    for which in ("score_matching", "markovian", "full"):
        def cell(key, w=which):
            return lambda r: ((r.get("ablation") or {}).get("backbone") or {}).get(w, {}).get(key)
        ab_rows.append((("backbone", which), [cell("clip_direction"), cell("l1"), cell("ssim")]))
    if any((r.get("ablation") or {}).get("enabled") for r in reports):
        print("\n".join(table(reports, ["method", "interval", "CLIP direction", "L1 to source", "SSIM"],
                              ab_rows, ["+.4f", ".4f", ".3f"])))
        print()


if __name__ == "__main__":
    sys.exit(main())
