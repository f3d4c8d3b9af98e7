"""stages/evaluate.run on tiny real models and bundled faces: every table carries mean ± std
and the image count, both edit modes are reported, and the posterior-mean gap is PDAE's along
the N-step chain (hfedit.evaluation.reconstruction.posterior_mean_gaps)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from hfedit.models.backbone import save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.config import DataConfig, RectifierConfig, RectifierTrunk, load_config
from hfedit.data.prepared import load_split, prepare_dataset
from hfedit.models.rectifier import build_rectifier
from tests.conftest import perturbed

SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)


def test_evaluate_reports_mean_std_counts_modes_and_the_posterior_mean_gap(random_denoiser,
                                                                            tmp_path):
    from hfedit.evaluation.reconstruction import posterior_mean_gaps
    from stages.evaluate import run

    save_backbone(random_denoiser, tmp_path / "bb")
    torch.manual_seed(0)
    base = build_rectifier(SMALL, random_denoiser.unet)
    save_rectifier(tmp_path / "rect", perturbed(base, 0.01, seed=3))
    save_rectifier(tmp_path / "edits" / "smiling", perturbed(base, 0.05, seed=1))
    prepare_dataset(DataConfig(resolution=32, max_images=10, val_fraction=0.3), tmp_path / "data",
                    progress=False)
    cfg = load_config(overrides=["evaluate.steps=[4]", "evaluate.images=3", "inversion.num_steps=4",
                                 "clip.model=ViT-S-32", "evaluate.gap_timesteps=3"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run(cfg, tmp_path / "bb", tmp_path / "rect", tmp_path / "edits", tmp_path / "data",
                     tmp_path / "batch", tmp_path / "report.json", tmp_path / "eval")
    images = load_split(tmp_path / "data", "val")[:3]
    assert report["images"] == images.shape[0] == 3
    rec = report["reconstruction"]
    for row in rec["rows"]:  # edit-friendly rows are exact: L1 0 ± 0
        assert row["images"] == 3 and (row["l1_std"] > 0) == (row["inversion"] == "ddim")
    from hfedit.models.checkpoint import load_rectifier

    rect, _ = load_rectifier(tmp_path / "rect", random_denoiser.unet)
    expected = posterior_mean_gaps(random_denoiser, images, [4], rect, cfg.inversion.seed)
    assert [(r["model"], r["images"]) for r in rec["posterior_mean_gap"]] == [
        ("backbone", 3), ("rectifier", 3)]
    for got, want in zip(rec["posterior_mean_gap"], expected):
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-5) and got["std"] > 0
    modes = report["modes"]["smiling"][0]
    assert modes["default"] == "edit_friendly" and modes["ddim"]["images"] == 3
    assert modes["difference"]["max"] > 0 and modes["ddim"]["l1"] != modes["edit_friendly"]["l1"]
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "posterior-mean gap" in text and "| smiling | ddim |" in text
    assert text.count(" ± ") >= 10
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["modes"]["smiling"][0]["ddim"]["l1"] == modes["ddim"]["l1"]
    # DVC's metrics file: the headline numbers at the headline N (pipelines.tracking.HEADLINE),
    # named as in MLflow; the side-by-side comparisons are in the report only
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    leaves = list(_leaves(metrics))
    assert leaves and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          for _, v in leaves)
    assert "modes" not in metrics and "conditioning" not in metrics
    assert metrics["editing"]["smiling"]["l1"] == report["editing"]["smiling"][0]["l1"]
    assert metrics["reconstruction"]["rectifier"]["posterior_mean_gap"] == \
        rec["posterior_mean_gap"][1]["mean"]
    assert len(leaves) == 15  # 2 + 6 reconstruction + 3 smiling + 2 strengths x 2 models SDEdit

    # evaluate.side_by_side=[]: the same edits of the configured mode and conditioning, and
    # neither comparison (each was one more edit per attribute, image and N)
    from hfedit.editing.editor import load_edit_rectifiers
    from hfedit.evaluation.comparisons import evaluate_edits
    from hfedit.models.clip import load_clip

    lean = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, side_by_side=[]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(cfg.clip, torch.device("cpu"))
    edits = load_edit_rectifiers(tmp_path / "edits", random_denoiser.unet)
    editing, _, conditioning, by_mode = evaluate_edits(lean, random_denoiser, edits, clip, images)
    assert conditioning == {} and by_mode == {}
    for k in ("l1", "clip_direction"):
        assert editing["smiling"][0][k] == pytest.approx(report["editing"]["smiling"][0][k], rel=1e-5)


def _leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_sdedit_with_an_untrained_rectifier_is_the_backbones_and_a_trained_one_differs(
        random_denoiser, faces):
    """The paper's Fig. 7 rows: the same noise with and without the rectifier, so an untrained
    rectifier (the backbone itself) gives the backbone's SDEdit exactly."""
    from hfedit.evaluation import metrics as M
    from hfedit.editing.editor import Editor
    from hfedit.evaluation.comparisons import evaluate_sdedit

    cfg = load_config(overrides=["evaluate.sdedit_strengths=[0.3,0.6]"])
    torch.manual_seed(0)
    base = build_rectifier(SMALL, random_denoiser.unet)
    images = faces[:3]
    same = evaluate_sdedit(cfg, random_denoiser, base, images, 6)
    assert [r["strength"] for r in same] == [0.3, 0.6]
    for r in same:  # equal up to the float rounding of the grouped conv vs the plain one
        assert r["difference"]["max"] <= 1e-5
        assert r["rectifier"] == pytest.approx(r["backbone"], rel=1e-4)
    moved = evaluate_sdedit(cfg, random_denoiser, perturbed(base, 0.05, seed=1), images, 6)
    for r, s in zip(moved, same):
        assert r["difference"]["max"] > 1e-3 and r["backbone"] == s["backbone"]
    # the backbone's row is SDEdit of image i with seed inversion.seed + i, scored against it
    inv = dataclasses.replace(cfg.inversion, num_steps=6)
    out = Editor(random_denoiser, inv).translate(images, [0, 1, 2], 0.6).clamp(-1, 1)
    assert moved[1]["backbone"]["l1"] == pytest.approx(float(M.l1(images, out).mean()), rel=1e-6)
    assert moved[1]["backbone"]["l1"] > moved[0]["backbone"]["l1"]  # freer at a larger strength
