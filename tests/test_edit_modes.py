"""``inversion.mode``: the edit-friendly replay and the DDIM protocol (invert with the
backbone, DDIM-sample through the rectified model conditioned on the source), through the one
entry every front end uses (:class:`hfedit.editing.editor.Editor`)."""

from __future__ import annotations

import pytest
import torch

from hfedit.config import Conditioning, EditMode, InversionConfig, RectifierConfig, RectifierTrunk
from hfedit.editing.editor import Editor
from hfedit.diffusion.inversion import ddim_invert, ddim_sample, replay
from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier
from hfedit.diffusion.schedule import Schedule, posterior_mean
from tests.conftest import perturbed

SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)
SEEDS = [3, 4]
N = 6


@pytest.fixture(scope="module")
def untrained(random_denoiser):
    torch.manual_seed(0)
    return build_rectifier(SMALL, random_denoiser.unet)


def _editor(d, rects, mode, skip=0, condition=Conditioning.trajectory):
    return Editor(d, InversionConfig(num_steps=N, skip=skip, condition=condition, mode=mode), rects)


@pytest.mark.parametrize("condition", list(Conditioning))
def test_ddim_mode_with_an_untrained_rectifier_is_the_backbones_ddim_reconstruction(
        trained_denoiser, untrained, faces, condition):
    d, x0 = trained_denoiser, faces[:2]
    reference = ddim_sample(d, d.schedule, ddim_invert(d, d.schedule, x0, N).xts[0], N)
    batch = _editor(d, {"smiling": untrained}, EditMode.ddim, condition=condition).edit(
        x0, SEEDS, ("smiling", "reconstruction"))
    # DDIM is not exact (else the test could not tell the modes apart) ...
    assert (reference - x0).abs().max() > 1e-2
    # ... and the untrained rectifier (Delta = 0) reproduces the backbone's DDIM chain, up to
    # the grouped conv's float rounding carried through N deterministic steps (measured: 1e-4
    # at values near 5 on some CPUs of this machine's family; relative 2e-5)
    assert torch.allclose(batch.outputs["smiling"], reference, atol=1e-5, rtol=1e-4)
    assert torch.equal(batch.outputs["reconstruction"], reference)
    assert batch.evaluations == {"inversion": N, "smiling": N, "reconstruction": N}


def test_edit_friendly_mode_stays_exact_and_differs_from_ddim(trained_denoiser, untrained, faces):
    d, x0 = trained_denoiser, faces[:2]
    ef = _editor(d, {"smiling": untrained}, EditMode.edit_friendly).edit(
        x0, SEEDS, ("smiling", "reconstruction"))
    assert (ef.outputs["reconstruction"] - x0).abs().max() < 1e-5
    assert (ef.outputs["smiling"] - x0).abs().max() < 1e-4
    ddim = _editor(d, {"smiling": untrained}, EditMode.ddim).edit(x0, SEEDS, ("smiling",))
    assert (ddim.outputs["smiling"] - x0).abs().max() > 1e-2


def test_ddim_mode_edits_through_the_rectifier_conditioned_on_the_source(random_denoiser,
                                                                         untrained, faces):
    """A trained (perturbed) rectifier changes the DDIM result; live conditioning equals DDIM
    sampling with the rectified model conditioned on the source (``ModulatedDenoiser``), and
    ``skip`` starts from the DDIM state at ``timesteps[skip]``."""
    d, x0 = random_denoiser, faces[:2]
    rect = perturbed(untrained, 0.05, seed=1)
    inv = ddim_invert(d, d.schedule, x0, N)
    plain = ddim_sample(d, d.schedule, inv.xts[0], N)
    for skip in (0, 2):
        live = _editor(d, {"a": rect}, EditMode.ddim, skip=skip,
                       condition=Conditioning.live).edit(x0, SEEDS, ("a",)).outputs["a"]
        model = ModulatedDenoiser(d, rect).conditioned(x0)
        ts = d.schedule.timesteps(N)
        x = inv.xts[skip]
        for t, s in list(zip(ts, Schedule.prev_timesteps(ts)))[skip:]:
            x = posterior_mean(d.schedule.step_coefficients(t, s, 0.0), x, model(x, t))
        assert torch.allclose(live, x, atol=1e-5, rtol=0)
        if skip == 0:
            assert (live - plain).abs().max() > 1e-3
    traj = _editor(d, {"a": rect}, EditMode.ddim).edit(x0, SEEDS, ("a",)).outputs["a"]
    assert (traj - plain).abs().max() > 1e-3


def test_ddim_inversion_states_replay_as_ddim_sampling(random_denoiser, faces):
    d, x0 = random_denoiser, faces[:2]
    inv = ddim_invert(d, d.schedule, x0, N)
    assert inv.eta == 0.0 and inv.timesteps == tuple(d.schedule.timesteps(N))
    assert torch.equal(inv.xts[0], ddim_invert(d, d.schedule, x0, N).xts[0])
    assert torch.equal(replay(d, d.schedule, inv), ddim_sample(d, d.schedule, inv.xts[0], N))


# ------------------------------------------------------------------- the front ends
def test_cli_edit_mode_ddim_writes_the_ddim_edit(random_denoiser, untrained, tmp_path, capsys):
    """``python -m hfedit edit --mode ddim`` with an untrained rectifier writes the backbone's
    DDIM reconstruction of the prepared input (to one 8-bit level), not the input."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from hfedit.models.backbone import save_backbone
    from hfedit.models.checkpoint import save_rectifier
    from hfedit.cli import main
    from hfedit.data.images import load_image, to_tensor

    save_backbone(random_denoiser, tmp_path / "bb")
    Image.fromarray(data.astronaut()).save(tmp_path / "astro.png")
    save_rectifier(tmp_path / "edits" / "zero", untrained, {"clip": {"semantic": True}})
    assert main(["edit", str(tmp_path / "astro.png"), "--attribute", "zero", "--mode", "ddim",
                 "--backbone", str(tmp_path / "bb"), "--out", str(tmp_path / "out"),
                 "--steps", str(N), "--edits", str(tmp_path / "edits")]) == 0
    assert "ddim" in capsys.readouterr().out
    d = random_denoiser
    x0 = to_tensor(load_image(tmp_path / "astro.png", 10**8).image, d.sample_size)[None]
    ref = ddim_sample(d, d.schedule, ddim_invert(d, d.schedule, x0, N).xts[0], N).clamp(-1, 1)
    ref8 = ((ref[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    png = np.asarray(Image.open(tmp_path / "out" / "astro_zero.png"), dtype=np.int16)
    src = np.asarray(Image.open(tmp_path / "out" / "astro_input.png"), dtype=np.int16)
    assert np.abs(png - ref8).max() <= 1 and np.abs(png - src).max() > 2


def test_edit_batch_mode_ddim_reconstructs_as_ddim(random_denoiser, tmp_path):
    """edit_batch --mode ddim (plain-loop executor, the same functions as the Ray actors): the
    reconstruction of each image is the backbone's DDIM reconstruction."""
    import numpy as np
    from PIL import Image

    from hfedit.data.images import load_image, to_tensor
    from hfedit.models.backbone import save_backbone
    from pipelines import edit_batch as eb
    from tests.conftest import real_faces

    faces = real_faces(2)
    (tmp_path / "in").mkdir()
    for i, f in enumerate(faces):
        Image.fromarray(((f + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(
            tmp_path / "in" / f"f{i}.png")
    save_backbone(random_denoiser, tmp_path / "bb")
    args = eb.parse_args(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                          "--attributes", "reconstruction", "--steps", str(N), "--mode", "ddim"])
    cfg = eb.config_from_args(args)
    assert cfg.inversion.mode is EditMode.ddim
    result = eb.run_job(cfg, tmp_path / "in", tmp_path / "out", str(tmp_path / "bb"),
                        progress=False, executor=eb.execute_plain)
    assert result.exit_code == 0
    d = random_denoiser
    for row in result.manifest.itertuples():
        x0 = to_tensor(load_image(tmp_path / "in" / row.id, 10**8).image, d.sample_size)[None]
        ref = ddim_sample(d, d.schedule, ddim_invert(d, d.schedule, x0, N).xts[0], N).clamp(-1, 1)
        ref8 = ((ref[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()
        png = np.asarray(Image.open(tmp_path / "out" / row.output), dtype=np.int16)
        assert np.abs(png - ref8).max() <= 1 and row.max_error > 1e-2
