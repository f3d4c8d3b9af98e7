"""pipelines/edit_ablation.run_stage in-process (Ray's task API replaced by direct calls): both
methods trained and scored on their own interval and on the full one, the backbone alone on
every interval, the table evaluate puts in results.md."""

from __future__ import annotations

import warnings

from hfedit.models.backbone import save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.config import DataConfig, load_config
from hfedit.data.prepared import prepare_dataset
from tests.conftest import perturbed_rectifier


class _Inline:
    """``ray.remote(fn)`` stand-in: ``.options(...).remote(spec)`` calls ``fn(spec)``."""

    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, spec):
        return self.fn(spec)


def test_each_method_on_its_own_and_the_full_interval_beside_the_backbone(random_denoiser,
                                                                        tmp_path, monkeypatch):
    import ray

    import pipelines.ray_runtime as rr
    from hfedit.evaluation.report import ablation_markdown
    from pipelines.edit_ablation import ablation_metrics, run_stage

    monkeypatch.setattr(ray, "remote", _Inline)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(rr, "task_placement", lambda cfg: ("cpu", 0.0))
    save_backbone(random_denoiser, tmp_path / "bb")
    save_rectifier(tmp_path / "rect", perturbed_rectifier(random_denoiser, 0.01))
    prepare_dataset(DataConfig(resolution=32, max_images=10, val_fraction=0.3), tmp_path / "data",
                    progress=False)
    cfg = load_config(overrides=[
        "clip.model=ViT-S-32", "inversion.num_steps=5", "edits.markovian.t0=400",
        "edits.markovian.inversion_steps=2", "edits.markovian.train_steps=2",
        "edits.ablation.steps=1", "edits.ablation.eval_images=2",
        "edits.attributes.smiling.batch_size=1", "edits.attributes.smiling.num_images=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_stage(cfg, tmp_path / "bb", tmp_path / "rect", tmp_path / "data",
                           tmp_path / "plots")
    assert "failed" not in report, report.get("failed")
    sm, mk = report["score_matching"], report["markovian"]
    # N = 5 strided by 200: 800, 600, 400, 200, 0; t0 = 400 -> the Markovian's own start
    assert (sm["mode"], sm["start"], sm["skip"]) == ("edit_friendly", 800, 0)
    assert (mk["mode"], mk["start"], mk["skip"]) == ("ddim", 400, 2)
    assert mk["intervals"]["full"]["start"] == 800 and mk["intervals"]["full"]["mode"] == "ddim"
    assert mk["intervals"]["own"]["l1"] == mk["l1"] != mk["intervals"]["full"]["l1"]
    assert set(report["backbone"]) == {"score_matching", "markovian", "full"}
    assert report["backbone"]["score_matching"]["l1"] < 1e-5  # edit-friendly: exact
    assert report["backbone"]["full"]["l1"] > report["backbone"]["markovian"]["l1"] > 0
    for r in (sm, mk, *report["backbone"].values()):
        assert r["images"] == 2 and "l1_std" in r
    table = "\n".join(ablation_markdown(report))
    assert "| markovian | full: ddim 800->0" in table and "no rectifier (backbone)" in table
    # one name per number, MLflow's and DVC's: edit_ablation/<method>/<interval>/<metric>
    named = ablation_metrics(report)
    assert named["edit_ablation/markovian/own/l1"] == mk["l1"]
    assert named["edit_ablation/markovian/full/l1"] == mk["intervals"]["full"]["l1"]
    assert named["edit_ablation/backbone/full/l1"] == report["backbone"]["full"]["l1"]
    assert all(isinstance(v, float) for v in named.values())
    # the grid: six labelled rows of the two held-out images, enlarged to be readable
    from PIL import Image

    grid = Image.open(tmp_path / "plots" / "grid.png")
    scale = 2  # 32 px cells enlarged to 64
    assert grid.height == 6 * (32 + 2) * scale + 2 * scale and grid.width > 2 * 34 * scale
