"""The everyday paths: the README's Python example run verbatim, the front door against the CLI
(same pixels), save/load round trips, and every CLI subcommand in a real pseudo-terminal with
its progress bar on."""

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
from hfedit.models.backbone import save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.models.rectifier import build_rectifier
from hfedit.data.images import save_png
from tests.conftest import perturbed, real_faces

ROOT = Path(__file__).resolve().parents[1]
GRACE = "grace_hopper.jpg"


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory, random_denoiser):
    """A folder laid out as after ``./dev run``: models/backbone and models/edits/<attr>, the
    edit rectifiers perturbed so that an edit moves the image (stand-ins for trained ones)."""
    folder = tmp_path_factory.mktemp("project")
    save_backbone(random_denoiser, folder / "models" / "backbone")
    cfg = HfeditConfig().rectifier
    for seed, name in enumerate(("smiling", "old")):
        rect = perturbed(build_rectifier(cfg, random_denoiser.unet), scale=0.2, seed=seed)
        save_rectifier(folder / "models" / "edits" / name, rect, {"attribute": name})
    return folder


def _env(**extra) -> dict:
    return {**os.environ, "HFEDIT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def test_readme_python_example_runs_verbatim_and_matches_the_cli(project):
    run = subprocess.run([sys.executable, "-c", readme_python()], cwd=project, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    recon_l1 = float(re.search(r"\[([0-9.e+-]+)\]", run.stdout.splitlines()[0]).group(1))
    assert recon_l1 < 1e-5  # the plain replay of edit-friendly maps is the input
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
    assert max(first.metrics["reconstruction"]["l1"]) < 1e-5
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


PTY_CHILD = r"""
import sys
from hfedit.cli import main
args = sys.argv[1:]
for command in ("reconstruct", "invert", "shift", "colour", "edit", "translate"):
    extra = {"edit": ["--attribute", "smiling", "--edits", "models/edits"],
             "translate": ["--rectifier", "none", "--strength", "0.5"]}.get(command, [])
    rc = main([command, *args, *extra])
    print(f"RESULT {command} {rc}", flush=True)
"""


def test_every_cli_subcommand_runs_in_a_terminal_with_its_progress_bar(project, tmp_path):
    """A real pseudo-terminal: tqdm draws (and returns True from update()) only on a TTY."""
    import fcntl
    import pty
    import struct
    import termios

    face = tmp_path / "face.png"
    save_png(real_faces(1)[0], face)
    args = [str(face), "--steps", "4", "--backbone", "models/backbone", "--out",
            str(tmp_path / "out")]
    leader, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen([sys.executable, "-c", PTY_CHILD, *args], cwd=project, env=_env(),
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    results = dict(re.findall(r"RESULT (\w+) (\d+)", text))
    assert results == {c: "0" for c in ("reconstruct", "invert", "shift", "colour", "edit",
                                         "translate")}, text[-3000:]
    assert "hfedit reconstruct" in text and "pass" in text  # the bar was drawn on the terminal
    assert (tmp_path / "out" / "face_smiling.png").is_file()
    recon = np.asarray(Image.open(tmp_path / "out" / "face_reconstruction.png")).astype(int)
    assert np.abs(recon - np.asarray(Image.open(face)).astype(int)).max() <= 1
