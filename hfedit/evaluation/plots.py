"""The evaluate stage's plots: CSV tables DVC plots (one row per N), PNG figures and the labelled
before/after grids. Each file is written whole (:mod:`hfedit.files`) or not at all."""

from __future__ import annotations

from pathlib import Path

import torch

from hfedit.files import atomic_savefig, atomic_write_csv

# Images per before/after grid: evaluate.images may be the paper's ~100 (Table 2) or 10,000
# (Table 1); a grid that wide is unreadable and large.
GRID_IMAGES = 8


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
    """``<folder>/<attribute>.csv`` per attribute: steps, CLIP direction and fidelity per N."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_n in results.items():
        keys = ["steps", "clip_direction", "l1", "ssim", "psnr", "identity"]
        atomic_write_csv(folder / f"{name}.csv", keys,
                         (["" if r.get(k) is None else r.get(k) for k in keys] for r in per_n))


def plot_reconstruction(rows: list[dict], gap: dict, path: Path) -> None:
    """L1 to the source vs N per model and inversion, beside the noise gap per model."""
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
    """Edit strength (directional CLIP) and fidelity (L1) vs N, one line per attribute."""
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


def write_edit_grids(images: torch.Tensor, edited: dict[str, list], folder: Path) -> None:
    """``<folder>/<attribute>.png`` per attribute: the first :data:`GRID_IMAGES` sources, then
    their edit at each N (``edited``: ``{attribute: [(N, edited images)]}``), rows labelled."""
    from hfedit.data.grids import make_grid_png

    k = min(GRID_IMAGES, images.shape[0])  # the scores use every image; a grid shows the first k
    for name, per_n in edited.items():
        grid = torch.cat([images[:k]] + [e[:k] for _, e in per_n])  # rows: source, edit at each N
        make_grid_png(grid, folder / f"{name}.png", nrow=k,
                      row_labels=["source"] + [f"{name}, N={n}" for n, _ in per_n])
