"""The Python front door: the README's example run verbatim, against the CLI (same pixels),
save/load round trips, settings checked before any work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hfedit.config import HfeditConfig
from tests.conftest import project_params, tiny_models

ROOT = Path(__file__).resolve().parents[1]
GRACE = "grace_hopper.jpg"


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory, random_denoiser):
    """A folder laid out as after ``./dev run`` (models/ only)."""
    folder = project_params(tmp_path_factory.mktemp("project"))
    tiny_models(folder / "models", random_denoiser)
    return folder


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("HFEDIT_ROOT", None)  # the project is the folder the command runs in
    return env


def test_readme_python_example_runs_verbatim_and_matches_the_cli(project):
    run = subprocess.run([sys.executable, "-c", readme_python()], cwd=project, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    recon_l1 = float(re.search(r"\[([0-9.e+-]+)\]", run.stdout.splitlines()[0]).group(1))
    assert recon_l1 < 1e-4  # the plain replay of edit-friendly maps is the input (float rounding)
    edited = np.asarray(Image.open(project / "grace_hopper_smiling.png"))

    from matplotlib import cbook

    photo = cbook.get_sample_data(GRACE, asfileobj=False)
    cli = subprocess.run([sys.executable, "-m", "hfedit", "edit", photo, "--attribute", "smiling",
                          "--seed", "0", "--backbone", "models/backbone", "--edits",
                          "models/edits", "--out", "cli", "--no-progress"],
                         cwd=project, env=_env(), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    by_cli = np.asarray(Image.open(project / "cli" / "grace_hopper_smiling.png"))
    assert np.array_equal(edited, by_cli)  # one code path: same pixels
    source = np.asarray(Image.open(project / "cli" / "grace_hopper_input.png")).astype(int)
    assert np.abs(edited.astype(int) - source).mean() > 1  # the edit moved the image
    # save_pretrained wrote a folder that loads on its own and edits the same
    assert (project / "my-pipeline" / "edits" / "smiling" / "rectifier.safetensors").is_file()


def test_saved_pipeline_edits_the_same_and_knows_its_settings(project, tmp_path, faces):
    import hfedit

    pipe = hfedit.HFEditPipeline.from_pretrained(project / "models", attributes=["old"],
                                                 inversion=HfeditConfig().inversion)
    image = ((faces[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    first = pipe([image, Image.fromarray(image)], attributes=["old", "reconstruction"],
                 num_steps=6, seed=3)
    a, b = (np.asarray(im) for im in first.images["old"])
    assert np.array_equal(a, b) is False  # image i is seeded seed + i: other noise, other edit
    assert max(first.metrics["reconstruction"]["l1"]) < 1e-4
    assert min(first.metrics["old"]["l1"]) > 1e-3

    pipe.save_pretrained(tmp_path / "saved")
    again = hfedit.HFEditPipeline.from_pretrained(tmp_path / "saved")
    assert again.attributes == ["old"]
    second = again([image, Image.fromarray(image)], attributes="old", num_steps=6, seed=3)
    for x, y in zip(first.images["old"], second.images["old"]):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(KeyError, match="smiling"):
        again(image, attributes="smiling")


def test_bad_settings_fail_with_the_key_before_any_work(project):
    import hfedit
    from hfedit.config import ConfigError

    pipe = hfedit.HFEditPipeline.from_pretrained(project / "models", attributes=[],
                                                 inversion=HfeditConfig().inversion)
    with pytest.raises(ConfigError, match="inversion.skip"):
        pipe(np.zeros((8, 8, 3), np.uint8), num_steps=4, skip=4)
