"""A local DVC remote, as the README sets it up: a first clone trains and pushes, a second clone
pulls the stage outputs (a persisted one included, like models/edits) instead of running the
stage again. Real DVC in temporary git repositories."""

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
def test_a_second_clone_pulls_what_the_first_pushed(tmp_path):
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@hfedit.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@hfedit.invalid"}
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
    _run(dvc + ["remote", "add", "-d", "local", str(remote)], first, env)
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
    shutil.rmtree(remote)
