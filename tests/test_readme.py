"""The README's snippets, verbatim, as a user runs them: the command-line block in a real
pseudo-terminal (progress bars drawn), and every per-attribute key the tuning section lists set
with ``dvc exp run -S``. (The Python example: tests/test_front_door.py; the `ray job submit`
block: tests/test_edit_batch_as_user.py.)"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hfedit.data.images import save_png
from tests.conftest import project_params, real_faces, tiny_models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def code_block(text: str, lang: str = "bash") -> str:
    (block,) = re.findall(rf"```{lang}\n(.*?)```", text, re.S)
    return block


def _in_terminal(command: list[str], cwd: Path, env: dict, timeout: float = 600) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal (100 columns) as its stdin, stdout and stderr."""
    leader, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=child, stdout=child, stderr=child,
                            close_fds=True)
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
    rc = proc.wait(timeout=timeout)
    os.close(leader)
    return rc, b"".join(chunks).decode(errors="replace")


def test_the_command_line_block_runs_verbatim_in_a_terminal(tmp_path, random_denoiser):
    """Every line of "The command line, one image", in a project laid out as after ./dev run,
    each with its progress bar on a real terminal (the bar once replaced the U-Net's output)."""
    project = tmp_path / "project"
    tiny_models(project / "models", random_denoiser)
    project_params(project)
    face = real_faces(1, 48)[0]
    save_png(face, project / "sketch.png")
    Image.open(project / "sketch.png").save(project / "photo.jpg", quality=95)
    block = code_block(section("The command line, one image"))
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 7 and all(line.startswith("hfedit ") for line in lines)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
    env.pop("HFEDIT_ROOT", None)  # found from the current folder, as a user's would be
    script = "set -e\n" + "\n".join(f"{line}\necho \"RC=$? {line.split()[1]}\"" for line in lines)
    rc, text = _in_terminal(["bash", "-c", script], project, env)
    assert rc == 0, text[-4000:]
    assert len(re.findall(r"RC=0 \w+", text)) == 7, text[-4000:]
    for sub in ("reconstruct", "edit", "invert", "shift", "colour"):
        assert f"hfedit {sub}" in text  # its progress bar was drawn
    out = project / "out"
    recon = np.asarray(Image.open(out / "photo_reconstruction.png")).astype(int)
    source = np.asarray(Image.open(out / "photo_input.png")).astype(int)
    assert np.abs(recon - source).max() <= 1  # "the input back, exactly" (8-bit rounding)
    assert {"photo_smiling.png", "photo_maps.safetensors", "photo_shift_8_0.png",
            "photo_colour.png", "sketch_translate_0.5.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.timeout(300)
def test_every_attribute_key_the_readme_lists_can_be_set_with_dvc_exp_run(tmp_path):
    """`dvc exp run -S edits.attributes.old.<key>=...` for each key of the tuning section, in a
    clone (queued, not run: DVC applies -S to params.yaml and refuses keys it lacks)."""
    listed = re.findall(r"`(\w+)`", section("Tuning one attribute").split("Changing one")[0])
    keys = [k for k in listed if k not in ("edits", "attributes", "params")]
    assert {"steps", "lambda_clip", "seed", "large_t"} <= set(keys)
    values = {"source": "a_face", "target": "an_old_face", "method": "markovian",
              "large_t": "none"}
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    sets = [a for k in keys for a in ("-S", f"edits.attributes.old.{k}={values.get(k, 2)}")]
    run = subprocess.run(["dvc", "exp", "run", "--queue", *sets], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    bad = subprocess.run(["dvc", "exp", "run", "--queue", "-S", "edits.attributes.old.stepz=2"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "stepz" in bad.stdout + bad.stderr  # a typo is refused
