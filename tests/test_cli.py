"""``python -m hfedit``: one real image file in, PNGs out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hfedit.models.backbone import save_backbone
from hfedit.cli import main


def _setup(tmp_path, random_denoiser):
    from skimage import data

    save_backbone(random_denoiser, tmp_path / "bb")
    Image.fromarray(data.astronaut()).save(tmp_path / "astro.jpg", quality=92)
    return ["--backbone", str(tmp_path / "bb"), "--out", str(tmp_path / "out"), "--steps", "10"]


def _png(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_reconstruct_writes_the_input_back(tmp_path, random_denoiser, capsys):
    args = _setup(tmp_path, random_denoiser)
    assert main(["reconstruct", str(tmp_path / "astro.jpg"), *args]) == 0
    rec = _png(tmp_path / "out" / "astro_reconstruction.png")
    inp = _png(tmp_path / "out" / "astro_input.png")
    assert rec.shape == (32, 32, 3) and np.abs(rec - inp).max() <= 1
    assert "max |result - input|" in capsys.readouterr().out


def test_shift_moves_the_picture(tmp_path, random_denoiser):
    args = _setup(tmp_path, random_denoiser)
    assert main(["shift", str(tmp_path / "astro.jpg"), "--dx", "5", "--dy", "0", *args]) == 0
    out = _png(tmp_path / "out" / "astro_shift_5_0.png")
    inp = _png(tmp_path / "out" / "astro_input.png")
    assert np.abs(out - inp).mean() > 5  # it changed (exactness of shifts: test_inversion)


def test_invert_writes_maps(tmp_path, random_denoiser):
    from safetensors.torch import load_file

    args = _setup(tmp_path, random_denoiser)
    assert main(["invert", str(tmp_path / "astro.jpg"), *args]) == 0
    maps = load_file(str(tmp_path / "out" / "astro_maps.safetensors"))
    assert maps["zs"].shape[0] == 10 and maps["timesteps"].tolist()[0] == 900
    assert (tmp_path / "out" / "astro_maps.png").is_file()


def test_bad_image_is_reported_not_raised(tmp_path, random_denoiser, capsys):
    args = _setup(tmp_path, random_denoiser)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["reconstruct", str(tmp_path / "broken.png"), *args]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "Fix:" in err


def test_a_corrupt_jpeg_is_refused_not_reconstructed(tmp_path, random_denoiser, capsys):
    from tests.test_data import damaged_jpeg

    args = _setup(tmp_path, random_denoiser)
    (tmp_path / "damaged.jpg").write_bytes(damaged_jpeg())
    assert main(["reconstruct", str(tmp_path / "damaged.jpg"), *args]) == 2
    err = capsys.readouterr().err
    assert "damaged.jpg: damaged JPEG data" in err and "Fix:" in err
    assert not (tmp_path / "out" / "damaged_reconstruction.png").exists()


@pytest.mark.parametrize("extra, says", [
    (["--steps", "0"], "inversion.num_steps=0 must be at least 1 (set by --steps"),
    (["--steps", "-3"], "inversion.num_steps=-3 must be at least 1"),
    (["--steps", "10", "--skip", "20"], "inversion.skip=20 must be less than inversion.num_steps=10"),
    (["--eta", "-1"], "inversion.eta=-1.0 must be 0 or more"),
    (["--out", "{tmp}/astro.jpg"], "astro.jpg is a file, not a folder: give a folder"),
    (["--out", "{tmp}/astro.jpg/sub"], "which is a file, not a folder"),
], ids=["steps 0", "steps -3", "skip >= steps", "eta < 0", "out is a file", "out under a file"])
def test_bad_arguments_are_refused_up_front_with_the_fix(tmp_path, random_denoiser, capsys, extra, says):
    """--steps 0 silently ran 50 steps; the others ended in tracebacks."""
    args = _setup(tmp_path, random_denoiser) + [e.format(tmp=tmp_path) for e in extra]
    assert main(["reconstruct", str(tmp_path / "astro.jpg"), *args]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_image_is_named_as_missing(tmp_path, random_denoiser, capsys):
    args = _setup(tmp_path, random_denoiser)
    assert main(["reconstruct", str(tmp_path / "photo.png"), *args]) == 2
    assert "photo.png: no such file. Fix:" in capsys.readouterr().err


# ------------------------------------------------------------------ as a user runs it
def test_nothing_is_written_when_the_command_fails_after_checks(tmp_path, random_denoiser, capsys):
    """The attribute is checked before the backbone loads, and no ``_input.png`` is left."""
    args = _setup(tmp_path, random_denoiser)
    (tmp_path / "edits").mkdir()
    assert main(["edit", str(tmp_path / "astro.jpg"), "--attribute", "smiling",
                 "--edits", str(tmp_path / "edits"), *args]) == 2
    err = capsys.readouterr().err
    assert "no edit rectifier for attribute 'smiling'" in err and "train_edits" in err
    assert not (tmp_path / "out").exists()
    # a missing image is refused before the (missing) backbone is even looked at
    assert main(["reconstruct", str(tmp_path / "nope.png"), "--backbone", str(tmp_path / "nobb"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_size_is_stated_when_it_differs_from_the_input(tmp_path, random_denoiser, capsys):
    args = _setup(tmp_path, random_denoiser)
    assert main(["reconstruct", str(tmp_path / "astro.jpg"), "--no-progress", *args]) == 0
    assert "the output is 32x32, the backbone's resolution; the input was 512x512" in \
        capsys.readouterr().err


def test_console_script_runs_from_any_folder_with_fast_help(tmp_path, random_denoiser):
    """``hfedit`` is installed as a console script; run from an unrelated folder (no params.yaml
    above it) it finds the project's config; ``--help`` lists every subcommand without importing
    torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = _setup(tmp_path, random_denoiser)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HFEDIT_ROOT"}
    env["PYTHONPATH"] = str(root)
    script = Path(sys.executable).with_name("hfedit")
    assert script.is_file(), "pyproject's [project.scripts] hfedit is not installed"
    help_ = subprocess.run([str(script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0
    for name in ("reconstruct", "invert", "shift", "colour", "edit", "translate"):
        assert f"  {name}" in help_.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, hfedit.cli as c\n"
                            "try:\n c.main(['--help'])\nexcept SystemExit: pass\n"
                            "print('torch' in sys.modules)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr
    run = subprocess.run([str(script), "reconstruct", str(tmp_path / "astro.jpg"), *args,
                          "--device", "cpu"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "astro_reconstruction.png").is_file()
