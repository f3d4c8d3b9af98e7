"""Stage ``train_edits`` on a real local Ray: one task per attribute in parallel, unchanged
attributes skipped on rerun, a failing attribute recorded without losing the others.

Each run is the stage script in a subprocess (its own local Ray on 127.0.0.1 and a temporary
MLflow store), on a random tiny backbone, a small reconstruction rectifier and the default CPU
CLIP architecture with random weights; 2 training steps per attribute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import perturbed_rectifier, prepared_faces

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "edits.attributes.smiling.steps=2", "--set", "edits.attributes.old.steps=2",
        "--set", "edits.attributes.smiling.batch_size=2", "--set", "edits.attributes.old.batch_size=2",
        "--set", "edits.attributes.smiling.num_images=4", "--set", "edits.attributes.old.num_images=4",
        "--set", "runtime.ray.edit_task_cpus=0.5", "--set", "runtime.ray.max_failures=0",
        "--set", "edits.log_every=1", "--set", "edits.share_trunk=true"]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, random_denoiser):
    """models/backbone, models/rectifier, data/prepared of a tiny pipeline, in a temp folder."""
    from hfedit.models.backbone import save_backbone
    from hfedit.models.checkpoint import save_rectifier

    root = tmp_path_factory.mktemp("pipeline")
    save_backbone(random_denoiser, root / "backbone")
    save_rectifier(root / "rectifier", perturbed_rectifier(random_denoiser, 0.01), {"step": 1})
    prepared_faces(root / "data", 8, val_fraction=0.25)  # 6 train, 2 val
    return root


def run_stage(root: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "pipelines" / "train_edits.py"),
           "--backbone", str(root / "backbone"), "--rectifier", str(root / "rectifier"),
           "--data", str(root / "data"), "--out", str(work / "edits"),
           "--metrics", str(work / "metrics.json"), *TINY, *extra]
    env = {**os.environ, "HFEDIT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


def _leaves(d: dict):
    for v in d.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]


def digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    """Both attributes trained from scratch; the folder every test starts from (copied)."""
    work = tmp_path_factory.mktemp("first")
    proc = run_stage(inputs, work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return work, proc


@pytest.mark.timeout(420)
def test_two_attributes_train_in_parallel_and_unchanged_ones_are_skipped(inputs, first_run,
                                                                        tmp_path):
    work, proc = first_run
    report = json.loads((work / "metrics.report.json").read_text())
    status = json.loads((work / "edits" / "status.json").read_text())
    smiling, old = status["smiling"], status["old"]
    assert smiling["status"] == old["status"] == "trained" and report["trained"] == 2
    # the DVC metrics file holds the headline numbers only (pipelines.tracking.HEADLINE), the
    # report the rest; statuses and notes are in status.json and the log
    metrics = json.loads((work / "metrics.json").read_text())
    leaves = list(_leaves(metrics))
    assert len(leaves) == 6 and all(isinstance(v, (int, float)) for v in leaves)
    assert metrics["attributes"]["smiling"]["final_l1"] == smiling["final_l1"]
    assert report["attributes"]["smiling"]["final_loss"] == smiling["final_loss"]
    for tree in (report, metrics):  # times:
        assert not {"started_at", "train_seconds"} & set(tree["attributes"]["smiling"])
    assert smiling["train_seconds"] > 0  # in status.json (and MLflow), not in DVC's files
    # both tasks ran at once: their time windows overlap
    assert max(smiling["started_at"], old["started_at"]) < min(smiling["finished_at"],
                                                               old["finished_at"])
    # random CLIP is announced: log, metrics, MLflow tags on the stage and on each nested run
    assert "edits are not semantic" in proc.stderr and smiling["clip_semantic"] is False
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stage = [r for r in runs if r.data.tags.get("hfedit.stage") == "train_edits"
             and "hfedit.attribute" not in r.data.tags]
    children = {r.data.tags["hfedit.attribute"]: r for r in runs if "hfedit.attribute" in r.data.tags}
    assert len(stage) == 1 and set(children) == {"smiling", "old"}
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == stage[0].info.run_id
        assert child.data.tags["hfedit.clip_semantic"] == "false"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "edit_training/loss")] == [1, 2]
    assert stage[0].data.tags["hfedit.clip_semantic"] == "false"
    # each folder: safetensors + config with the fingerprint of its params and inputs
    meta = json.loads((work / "edits" / "smiling" / "rectifier.json").read_text())
    assert meta["fingerprint"] == smiling["fingerprint"] and meta["edit"]["target"] == "a smiling face"
    assert (work / "edits" / "smiling" / "rectifier.safetensors").is_file()
    assert meta["backbone"]["source"] == "backbone" and str(inputs) not in json.dumps(meta)
    # edits.share_trunk: the trunk is not stored again; it is the reconstruction rectifier's
    base = work / "edits" / "smiling" / meta["base"]["path"]
    assert not Path(meta["base"]["path"]).is_absolute() and base.resolve() == (inputs / "rectifier").resolve()
    assert (work / "edits" / "smiling" / "rectifier.safetensors").stat().st_size < \
        0.7 * (inputs / "rectifier" / "rectifier.safetensors").stat().st_size
    # each attribute is a servable pyfunc model, @champion, tagged not semantic (random CLIP)
    for name, child in children.items():
        version = client.get_model_version_by_alias(f"hfedit-edit-{name}", "champion")
        assert version.run_id == child.info.run_id and version.tags["hfedit.semantic"] == "false"
        # logged from a Ray task, the model names the stage script as its source
        (model,) = client.search_logged_models([child.info.experiment_id],
                                               filter_string=f"source_run_id = '{child.info.run_id}'")
        source = model.tags["mlflow.source.name"]
        assert source.endswith("train_edits.py") and "default_worker" not in source

    # rerun with one attribute changed: only that one trains, the other's files stay as they were
    rerun = tmp_path / "rerun"
    shutil.copytree(work, rerun, ignore=shutil.ignore_patterns("mlflow.db"))
    before = digest(rerun / "edits" / "smiling")
    proc = run_stage(inputs, rerun, "--set", "edits.attributes.old.target=an elderly face")
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads((rerun / "metrics.report.json").read_text())
    status = json.loads((rerun / "edits" / "status.json").read_text())
    assert status["smiling"]["status"] == "skipped" and status["old"]["status"] == "trained"
    assert (report["trained"], report["skipped"]) == (1, 1)
    assert digest(rerun / "edits" / "smiling") == before
    assert json.loads((rerun / "edits" / "old" / "rectifier.json").read_text())["edit"]["target"] \
        == "an elderly face"


@pytest.mark.timeout(420)
def test_a_failing_attribute_leaves_the_others_output_intact(inputs, first_run, tmp_path):
    work, _ = first_run
    fail = tmp_path / "fail"
    shutil.copytree(work, fail, ignore=shutil.ignore_patterns("mlflow.db"))
    old_before = digest(fail / "edits" / "old")
    # smiling changes and retrains; old gets target == source: no edit direction, it fails
    proc = run_stage(inputs, fail, "--set", "edits.attributes.smiling.lr=0.002",
                     "--set", "edits.attributes.old.target=a face")
    assert proc.returncode != 0
    assert "1 attribute(s) failed: old (ValueError" in proc.stderr
    status = json.loads((fail / "edits" / "status.json").read_text())
    assert status["smiling"]["status"] == "trained"
    assert json.loads((fail / "metrics.json").read_text())["failed"] == 1
    assert status["old"]["status"] == "failed" and "same CLIP embedding" in status["old"]["error"]
    # the failed attribute's previous output is untouched, the other one is new and complete
    assert digest(fail / "edits" / "old") == old_before
    meta = json.loads((fail / "edits" / "smiling" / "rectifier.json").read_text())
    assert meta["edit"]["lr"] == pytest.approx(0.002)
    assert not [p for p in (fail / "edits").iterdir() if p.name.startswith(".")]
