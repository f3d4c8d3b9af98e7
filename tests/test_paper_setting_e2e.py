"""The paper's setting through the whole DAG: ``profile: celebahq256`` with a random-weight
stand-in of google/ddpm-ema-celebahq-256 (113.7M parameters, the hub repo's flat layout), a
random-weight ViT-B-32 weights file for ``clip.weights`` and six real photographs at 256 px.

The profile is used as shipped: params.yaml sets only ``backbone.source``, ``clip.weights`` and
``data.source`` beside step counts small enough for a 2-core CPU (one training step, two
inversion steps). Every stage runs under ``dvc repro``; the test asserts what each one wrote.
One held-out image throughout, no SDEdit rows, no side-by-side edit comparisons and the
edit_ablation stage switched off (all four are tested on the tiny profile, in
tests/test_pipeline_e2e.py): at 256 px every image costs each stage minutes on a 2-core CPU (a
forward pass of the 113.7M-parameter U-Net is 6-9 s). With two held-out images, two SDEdit
strengths and both comparisons this test took 37 min of a 74-min CI run (evaluate alone 17 min);
with one image and none of them, 20 min of a 51.5-min suite (the ablation 4.5 of them). Idle on
this project's 2-core machine (2026-12-07, one run each): 883 s under ./dev's PASSIVE wait
policy, 775 s under OpenMP's default (stage_env), 710 s with the lone Ray Train worker and
edit_batch actor on both cores, one gap timestep and one image per attribute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_pipeline_e2e import BIN, STAGES, _fresh_copy, _run, _stages_run, stage_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# Step counts, image counts and where work runs; nothing of the profile itself.
SMALL_COUNTS = {
    "data.val_fraction": 0.17,  # 5 train, 1 val
    "backbone.train.sample_steps": 2, "backbone.train.num_samples": 1,
    "pretrain.steps": 1, "pretrain.batch_size": 1, "pretrain.checkpoint_every": 1,
    "pretrain.log_every": 1, "pretrain.eval_steps": 2, "pretrain.eval_images": 1,
    "pretrain.eval_gap_timesteps": 1,
    **{f"edits.attributes.{a}.{k}": v for a in ("smiling", "old", "man", "pixar")
       for k, v in (("steps", 1), ("num_images", 1), ("batch_size", 1))},
    "edits.markovian.inversion_steps": 2, "edits.markovian.train_steps": 1,
    "edits.ablation.enabled": False, "edits.log_every": 1,
    "inversion.num_steps": 2,
    "edit_batch.actors": 1, "edit_batch.batch_size": 2,
    # speed only (params.yaml: "never the outputs"): the lone actor computes on both cores
    "edit_batch.num_cpus": 1, "edit_batch.torch_threads": 2,
    "evaluate.steps": [2], "evaluate.images": 1, "evaluate.gap_timesteps": 1,
    "evaluate.sdedit_strengths": [], "evaluate.side_by_side": [],
}
# One Ray Train worker (each holds a 113.7M-parameter backbone and its activations at 256 px),
# given both cores: with one, the other sat idle through the training step.
RUNTIME = {"ray.num_workers": 1, "ray.cpus_per_worker": 2, "ray.torch_threads_per_worker": 2}


def _photos(folder: Path) -> list[str]:
    """Six real photographs that ship inside scikit-image and matplotlib, as files."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    arrays = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "camera": data.camera()}
    for name, array in arrays.items():
        Image.fromarray(np.asarray(array)).save(folder / f"{name}.png")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        img.convert("RGB").save(folder / "grace_hopper.jpg", quality=95)
    return sorted(p.name for p in folder.iterdir())


def _random_vit_b32(path: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_paper_setting_runs_every_stage(tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from hfedit.testing import write_celebahq256_standin
    from hfedit.data.prepared import load_split

    standin = write_celebahq256_standin(tmp_path / "ddpm-ema-celebahq-256")
    assert sorted(p.name for p in standin.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    photos = _photos(tmp_path / "photos")
    clip_file = _random_vit_b32(tmp_path / "vit-b-32.safetensors")
    work = _fresh_copy(tmp_path / "repo", {
        "profile": "celebahq256", "backbone.source": str(standin),
        "clip.weights": str(clip_file), "data.source": str(tmp_path / "photos"), **SMALL_COUNTS,
    }, RUNTIME)
    env = stage_env()

    log = _run([str(BIN / "dvc"), "repro"], work, env, timeout=3300)
    assert _stages_run(log) == STAGES, log[-4000:]

    # prepare: every photo at 256 px, split 5 / 1
    manifest = json.loads((work / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["ok"] == len(photos) == 6 and manifest["counts"]["error"] == 0
    for split, n in (("train", 5), ("val", 1)):
        assert load_split(work / "data/prepared", split).shape == (n, 3, 256, 256)

    # backbone: the stand-in resolved and re-saved unchanged (113.7M parameters at 256 px)
    meta = json.loads((work / "models/backbone/hfedit.json").read_text())
    assert meta["parameters"] == 113_673_219 and meta["sample_size"] == 256
    assert meta["source"] == str(standin)
    key = "up_blocks.1.attentions.0.to_q.weight"
    with safe_open(str(standin / "diffusion_pytorch_model.safetensors"), "pt") as a, \
            safe_open(str(work / "models/backbone/unet/diffusion_pytorch_model.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))

    # pretrain_rectifier: one training step on Ray Train, then the held-out report
    pre = json.loads((work / "metrics/pretrain_rectifier.report.json").read_text())
    assert pre["training"]["step"] == 1 and pre["images"] == 1 and pre["num_steps"] == 2
    for model in ("backbone", "rectifier"):
        assert pre[model]["edit_friendly_max_error"] < 1e-4  # exact at 256 px too
        assert pre[model]["l1"] > 0 and pre[model]["gap"] > 0
    rect_meta = json.loads((work / "models/rectifier/rectifier.json").read_text())
    assert rect_meta["rectifier_config"]["trunk"] == "resnet34"

    # train_edits: the profile's four attributes, with the ViT-B-32 weights file (CLIP is
    # "semantic")
    status = json.loads((work / "models/edits/status.json").read_text())
    assert {a: s["status"] for a, s in status.items()} == {
        a: "trained" for a in ("smiling", "old", "man", "pixar")}
    clip = json.loads((work / "models/edits/smiling/rectifier.json").read_text())["clip"]
    assert clip["model"] == "ViT-B-32" and clip["semantic"] is True
    assert all(s["clip_semantic"] is True for s in status.values())

    # edit_ablation: switched off (it ran, and said so); both methods are the tiny profile's
    assert json.loads((work / "plots/edit_ablation/report.json").read_text())["enabled"] is False

    # edit_batch: the val image x (reconstruction, smiling, old), 256 px PNGs
    batch = json.loads((work / "metrics/edit_batch.json").read_text())
    assert batch["edited"] == 1 and batch["failed"] == 0, batch
    assert batch["attributes"]["reconstruction"]["max_error"] < 1e-4
    for attribute in ("reconstruction", "smiling", "old"):
        pngs = sorted((work / "outputs/val" / attribute).glob("*.png"))
        assert len(pngs) == 1 and all(Image.open(p).size == (256, 256) for p in pngs)

    # evaluate: both models x both inversions at N = 2, the edits, the grids
    report = json.loads((work / "eval/report.json").read_text())
    assert report["resolution"] == 256 and report["images"] == 1 and report["steps"] == [2]
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    rows = report["reconstruction"]["rows"]
    assert {(r["model"], r["inversion"]) for r in rows} == {
        (m, i) for m in ("backbone", "rectifier") for i in ("ddim", "edit_friendly")}
    assert max(r["max_error"] for r in rows if r["inversion"] == "edit_friendly") < 1e-4
    assert sorted(report["editing"]) == ["man", "old", "pixar", "smiling"]
    for name in ("smiling", "old"):  # rows: the source, then the edit at N = 2; a label column
        width, height = Image.open(work / "eval/grids" / f"{name}.png").size
        assert width > 256 and height >= 2 * 256
