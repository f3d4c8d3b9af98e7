"""``python -m hfedit``: one real image file in, PNGs out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hfedit.backbone import save_backbone
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
