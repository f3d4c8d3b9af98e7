"""pipelines/studies.py on a real DVC project: experiments run by `dvc exp run --temp` from the
committed baseline, then tabulated from `dvc exp show --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import studies

BIN = Path(sys.executable).parent

# A stage whose metric is a known function of the studied param: the table must carry it.
STAGE = """
import json, yaml
p = yaml.safe_load(open("params.yaml"))
loss = p["pretrain"]["loss"]
value = {"noise": 0.25, "l1": 0.5, "l1_dw": 0.75}[loss]
open("eval/metrics.json", "w").write(json.dumps({"reconstruction": {
    "rectifier_ddim": {"l1": value}, "backbone_ddim": {"l1": 1.0}}}))
"""


@pytest.mark.timeout(600)
def test_a_study_runs_as_dvc_experiments_and_its_table_holds_each_experiments_metrics(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}

    def sh(*cmd):
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "eval").mkdir()
    (tmp_path / "params.yaml").write_text("pretrain:\n  loss: noise\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python stage.py\n    deps: [stage.py]\n"
        "    params: [pretrain.loss]\n    metrics:\n      - eval/metrics.json:\n"
        "          cache: false\n")
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")

    old, root = os.environ.copy(), studies.ROOT
    os.environ.update(env)
    try:
        assert studies.main(["--root", str(tmp_path), "run", "loss"]) == 0
        text = studies.report("loss", tmp_path / "studies")
    finally:
        os.environ.clear()
        os.environ.update(old)
        studies.ROOT = root
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    # the baseline (noise) and the two other losses, each with the value its own run computed
    assert rows["baseline"][1] == "noise" and rows["baseline"][2] == "0.2500"
    for exp, loss, value in (("l1", "l1", "0.5000"), ("l1_dw", "l1_dw", "0.7500")):
        assert rows[exp][1] == loss and rows[exp][2] == value, text
    assert "2 of 2 experiments found" in text
    assert (tmp_path / "studies" / "loss.md").read_text() == text
    assert (tmp_path / "studies" / "loss.png").stat().st_size > 1000
    # the baseline's workspace is untouched: --temp ran each experiment elsewhere
    assert (tmp_path / "params.yaml").read_text() == "pretrain:\n  loss: noise\n"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())[
        "reconstruction"]["rectifier_ddim"]["l1"] == 0.25


def test_every_study_column_is_a_headline_number_dvc_keeps():
    """The DVC metrics files hold only pipelines.tracking.HEADLINE; a study reads its columns from
    the experiments' metrics, so a column outside it would be empty in every table."""
    from fnmatch import fnmatchcase

    from pipelines.tracking import HEADLINE, headline

    stage = {studies.EVAL: "evaluate", studies.ABL: "edit_ablation", studies.PRE: "pretrain_rectifier"}
    columns = [(c.file, c.path) for s in studies.STUDIES.values() for c in s.columns]
    assert len(columns) > 20
    missing = [(f, p) for f, p in columns
               if not any(fnmatchcase(p, pattern) for pattern in HEADLINE[stage[f]])]
    assert not missing
    # and headline() keeps exactly those of a metrics file, nested as DVC shows them
    numbers = {"reconstruction": {"rectifier_ddim": {"l1": 0.1, "psnr": 30.0}},
               "modes": {"smiling": {"ddim": {"l1": 0.2}}}, "sdedit": {"s0.3": {"backbone": {"l1": 0.3, "ssim": 0.5}}}}
    assert headline(numbers, "evaluate") == {"reconstruction": {"rectifier_ddim": {"l1": 0.1}},
                                             "sdedit": {"s0.3": {"backbone": {"l1": 0.3}}}}
