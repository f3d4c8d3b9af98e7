"""DVC as the README uses it, with real DVC in temporary git repositories: a remote, local or
on an S3-compatible server (moto's, on 127.0.0.1) (a first clone trains and pushes, a second clone pulls the stage outputs, a persisted one included,
like models/edits, instead of running the stage again), and `dvc plots show` offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps:
      - train.py
    outs:
      - models/rectifier
      - models/edits:
          persist: true
"""
TRAIN = """\
import os, pathlib
with open("runs.log", "a") as log:  # not an output: counts how often the stage ran
    log.write("ran\\n")
for name in ("rectifier/rectifier.safetensors", "edits/smiling/rectifier.safetensors"):
    path = pathlib.Path("models", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_second_clone_pulls_what_the_first_pushed(tmp_path, kind, request):
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@hfedit.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@hfedit.invalid"}
    if kind == "s3":
        import boto3

        s3 = request.getfixturevalue("s3_server")
        env.update(s3["env"])
        bucket = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        bucket.create_bucket(Bucket="hfedit-dvc")
    dvc = [str(venv_bin / "dvc")]
    first, second, remote = tmp_path / "first", tmp_path / "second", tmp_path / "dvc-remote"
    first.mkdir()
    _run(["git", "init", "-q", "-b", "main"], first, env)
    _run(dvc + ["init", "-q"], first, env)
    _run(dvc + ["config", "core.analytics", "false"], first, env)
    (first / "dvc.yaml").write_text(DVC_YAML)
    (first / "train.py").write_text(TRAIN)
    (first / ".gitignore").write_text("runs.log\n")
    _run(dvc + ["repro"], first, env)
    # the README's commands
    if kind == "local":
        _run(dvc + ["remote", "add", "-d", "local", str(remote)], first, env)
    else:  # docs/pipeline.md's S3 recipe, the endpoint pointed at the test's server
        _run(dvc + ["remote", "add", "-d", "store", "s3://hfedit-dvc/cache"], first, env)
        _run(dvc + ["remote", "modify", "store", "endpointurl", s3["endpoint"]], first, env)
    _run(dvc + ["push"], first, env)
    _run(["git", "add", "-A"], first, env)
    _run(["git", "commit", "-q", "-m", "trained"], first, env)

    _run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
    assert not (second / "models" / "rectifier").exists()  # only DVC's .gitignore came with git
    _run(dvc + ["pull"], second, env)
    for name in ("rectifier/rectifier.safetensors", "edits/smiling/rectifier.safetensors"):
        assert (second / "models" / name).read_bytes() == (first / "models" / name).read_bytes()
    assert "up to date" in _run(dvc + ["status"], second, env)
    _run(dvc + ["repro"], second, env)  # nothing to run: the pulled outputs are the stage's
    assert not (second / "runs.log").exists()
    assert (first / "runs.log").read_text() == "ran\n"
    if kind == "local":
        shutil.rmtree(remote)
    else:  # the objects are in the bucket, not in a local folder
        listed = bucket.list_objects_v2(Bucket="hfedit-dvc")
        assert listed["KeyCount"] >= 3 and not remote.exists()


@pytest.mark.timeout(300)
def test_dvc_plots_show_needs_no_network(tmp_path):
    """The project's .dvc/config points `dvc plots show` at conf/dvc_plots/offline.html: the page
    carries Vega, Vega-Lite and vega-embed inline and loads no script from a CDN."""
    root = Path(__file__).resolve().parents[1]
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    dvc = [str(venv_bin / "dvc")]
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    shutil.copy(root / ".dvc" / "config", repo / ".dvc" / "config")  # the project's settings
    shutil.copytree(root / "conf" / "dvc_plots", repo / "conf" / "dvc_plots")
    (repo / "loss.csv").write_text("step,loss\n1,0.9\n2,0.5\n3,0.31\n")
    (repo / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    _run(dvc + ["plots", "show", "-o", "page"], repo, env)
    html = (repo / "page" / "index.html").read_text()
    assert "vegaEmbed(" in html and "0.31" in html  # the plot's spec with its data
    assert "<script src" not in html and "cdn.jsdelivr" not in html
    for library in ("vega 5.20.2", "vega-lite 5.2.0", "vega-embed 6.18.2"):
        assert f"<!-- {library}" in html
