"""Edit training (Algorithm 1) and the Markovian baseline; editing and SDEdit with rectifiers.

Tiny real models on the CPU: the default tiny U-Net (random weights), a small rectifier and a
2-layer open_clip CLIP with random weights registered from a JSON config (as in
tests/test_clip_loss.py). Nothing downloads.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from hfedit.models.clip import DirectionalClipLoss, RandomClipWarning, directional_loss, load_clip
from hfedit.config import (
    AttributeConfig,
    ClipConfig,
    InversionConfig,
    MarkovianConfig,
    ModulationMode,
    RectifierConfig,
    RectifierTrunk,
)
from hfedit.training.edits import (
    EditLoss,
    MarkovianObjective,
    ScoreMatchingObjective,
    chain_timesteps,
    edit_rectifier_from,
    edit_step_markovian,
    edit_step_score_matching,
    train_edit,
)
from hfedit.editing.editor import Editor, load_edit_rectifiers
from hfedit.diffusion.inversion import ddim_invert
from hfedit.diffusion.sampling import sdedit
from hfedit.models.rectifier import ModulatedDenoiser, Rectifier, build_rectifier
from hfedit.diffusion.schedule import Schedule, posterior_mean, predict_x0, q_sample
from hfedit.training.reconstruction import make_optimizer
from tests.conftest import perturbed, perturbed_rectifier, real_faces

TINY_CLIP = "hfedit-test-tiny-clip-edits"
SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)
ATTR = AttributeConfig(source="a photo of a face", target="a photo of a smiling face", steps=3,
                       num_images=8, batch_size=2, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the shared 2-core machine runs other jobs (see test_rectifier.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                          "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                        "layers": 2}}
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomClipWarning)
        return load_clip(ClipConfig(model=TINY_CLIP, seed=5))




@pytest.fixture(scope="module")
def recon(random_denoiser) -> Rectifier:
    """Stands in for the pretrained reconstruction rectifier (Delta != 0 already)."""
    return perturbed_rectifier(random_denoiser, 0.01).eval()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ loss
def test_edit_loss_is_the_weighted_sum_of_direction_and_l1(clip, faces):
    loss = EditLoss(DirectionalClipLoss(clip, ATTR.source, ATTR.target), 0.7, 2.5)
    pred = (faces + 0.3 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(1)))
    terms = loss.terms(pred, faces)
    by_hand_dir = directional_loss(clip.encode_image(faces), clip.encode_image(pred),
                                   loss.direction.text_direction)
    by_hand_l1 = (pred - faces).abs().mean(dim=(1, 2, 3))
    assert torch.allclose(terms.direction, by_hand_dir, atol=1e-5)
    assert torch.allclose(terms.l1, by_hand_l1)
    assert torch.allclose(terms.total, 0.7 * by_hand_dir + 2.5 * by_hand_l1, atol=1e-5)
    cached = loss(pred, faces, source_embedding=loss.source_embedding(faces))
    assert torch.allclose(cached, terms.total, atol=1e-5)
    # not editing at all: no movement (direction loss 1) and no L1
    same = loss.terms(faces, faces)
    assert torch.allclose(same.direction, torch.ones(4)) and same.l1.abs().max() == 0
    with pytest.raises(ValueError, match="lambda_clip=0"):
        EditLoss(loss.direction, 0.0, 0.0)


# ------------------------------------------------------------------------ one step, frozen
@pytest.mark.parametrize("method", ["score_matching", "markovian"])
def test_an_edit_step_changes_only_rectifier_parameters(random_denoiser, recon, clip, faces, method):
    rect = edit_rectifier_from(recon)
    model = ModulatedDenoiser(random_denoiser, rect)
    loss = EditLoss(DirectionalClipLoss(clip, ATTR.source, ATTR.target))
    opt, _ = make_optimizer(rect, 1e-3, 0.0, 10, 0.9)
    backbone, clip_w, recon_w, before = (_state(random_denoiser), _state(clip), _state(recon),
                                         _state(rect))
    if method == "score_matching":
        stats = edit_step_score_matching(ScoreMatchingObjective(model, loss), opt, faces,
                                         torch.Generator().manual_seed(0), 1000)
    else:
        x_t0 = ddim_invert(random_denoiser, random_denoiser.schedule, faces,
                           timesteps=chain_timesteps(300, 3)).xts[0]
        stats = edit_step_markovian(MarkovianObjective(model, loss, 300, 2), opt, faces, x_t0)
    assert np.isfinite(stats.loss) and stats.delta_rms > 0
    for name, ref in [("backbone", backbone), ("clip", clip_w), ("reconstruction", recon_w)]:
        now = {"backbone": random_denoiser, "clip": clip, "reconstruction": recon}[name].state_dict()
        assert all(torch.equal(now[k], v) for k, v in ref.items()), name
    changed = [k for k, v in rect.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("head_a") for k in changed) and any(k.startswith("trunk") for k in changed)
    assert all(p.grad is None for p in random_denoiser.parameters())
    assert all(p.grad is None for p in clip.parameters())


def test_score_matching_starts_from_the_original_trajectory(random_denoiser, recon, clip, faces):
    """x0_edit = P_t[eps_theta~(x_t)] with x_t ~ q(x_t | x0): recomputed by hand here."""
    model = ModulatedDenoiser(random_denoiser, recon)
    objective = ScoreMatchingObjective(model, EditLoss(DirectionalClipLoss(clip, ATTR.source,
                                                                           ATTR.target)))
    t = torch.tensor([10, 200, 600, 950])
    eps = torch.randn(faces.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, out = objective(faces, t, eps)
        x_t = q_sample(random_denoiser.schedule, faces, t, eps)
        expected = predict_x0(random_denoiser.schedule, x_t, t, model(x_t, t, faces))
    assert torch.allclose(out.x0_edit, expected, atol=1e-5)


def test_markovian_chain_with_zero_offsets_is_plain_ddim(random_denoiser, clip, faces):
    rect = build_rectifier(SMALL, random_denoiser.unet)  # untrained: Delta = 0
    objective = MarkovianObjective(ModulatedDenoiser(random_denoiser, rect),
                                   EditLoss(DirectionalClipLoss(clip, ATTR.source, ATTR.target)),
                                   400, 3)
    assert objective.timesteps == [400, 200, 0]
    x_t0 = ddim_invert(random_denoiser, random_denoiser.schedule, faces,
                       timesteps=chain_timesteps(400, 5)).xts[0]
    with torch.no_grad():
        _, out = objective(faces, x_t0)
        x, s = x_t0, objective.timesteps
        for t, prev in zip(s, Schedule.prev_timesteps(s)):
            coef = random_denoiser.schedule.step_coefficients(t, prev, 0.0)
            x = posterior_mean(coef, x, random_denoiser(x, t))
    assert (out.x0_edit - x).abs().max() <= 1e-4
    # DDIM inversion then DDIM sampling lands near the source (not exactly: a random U-Net)
    assert (x - faces).abs().mean() < (x_t0 - faces).abs().mean()


class FrozenInput(torch.nn.Module):
    """Wraps a rectifier: records its ``P_t`` input per timestep, then replays the recorded one
    (the hypernetwork input is a constant of the graph: computed without gradients)."""

    def __init__(self, inner: Rectifier) -> None:
        super().__init__()
        self.inner, self.cfg, self.target_names = inner, inner.cfg, inner.target_names
        self.recorded: dict[int, torch.Tensor] = {}
        self.replay = False

    def forward(self, x0, p_t, t):
        key = int(t[0])
        if self.replay:
            p_t = self.recorded[key]
        else:
            self.recorded[key] = p_t.detach().clone()
        return self.inner(x0, p_t, t)


def test_markovian_gradient_runs_through_every_step_of_the_chain(random_denoiser, clip, faces):
    """Autograd's d loss / d x_t0 equals a float64 finite difference (with the hypernetwork's
    P_t inputs held at their values on the unperturbed chain): the chain is differentiated end
    to end, through every modulated U-Net pass including its down path."""
    d = copy.deepcopy(random_denoiser).double()
    rect = FrozenInput(perturbed(build_rectifier(SMALL, d.unet), scale=0.05).double())
    clip64 = copy.deepcopy(clip).double()
    # the directional term alone: the L1's kinks (|.| at 0) would make finite differences noisy
    objective = MarkovianObjective(ModulatedDenoiser(d, rect, "grouped"),
                                   EditLoss(DirectionalClipLoss(clip64, ATTR.source, ATTR.target),
                                            lambda_clip=1.0, lambda_recon=0.0), 300, 3)
    x0 = faces[:2].double()
    x_t0 = ddim_invert(d, d.schedule, x0, timesteps=chain_timesteps(300, 3)).xts[0]
    x_t0.requires_grad_(True)
    with torch.no_grad():
        objective(x0, x_t0)  # records P_t along the chain
    rect.replay = True
    loss, _ = objective(x0, x_t0)
    (grad,) = torch.autograd.grad(loss, x_t0)
    v = torch.randn(x_t0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        fd = (objective(x0, x_t0 + h * v)[0] - objective(x0, x_t0 - h * v)[0]).item() / (2 * h)
    assert (grad * v).sum().item() == pytest.approx(fd, rel=1e-5)


def test_chain_timesteps():
    assert chain_timesteps(500, 4) == [500, 333, 167, 0]
    assert chain_timesteps(9, 10) == list(range(9, -1, -1))
    assert chain_timesteps(250, 1) == [250]
    with pytest.raises(ValueError, match="t0=3, num_steps=6"):
        chain_timesteps(3, 6)


# ----------------------------------------------------------------------- a short training
def _held_out_loss(model, loss, x0, seed=123) -> float:
    """Mean L_edit at fixed (t, eps) on the training images (t spread over [100, 800])."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(100, 800, x0.shape[0]).long()
    eps = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        return ScoreMatchingObjective(model, loss)(x0, t, eps)[0].item()


def test_edit_loss_decreases_over_a_short_run(random_denoiser, recon, clip):
    x0 = real_faces(8)
    cfg = AttributeConfig(source=ATTR.source, target=ATTR.target, steps=30, num_images=8,
                          batch_size=4, lr=1e-3, decay_every=10, decay=0.9, seed=0)
    loss = EditLoss(DirectionalClipLoss(clip, cfg.source, cfg.target))
    before = _held_out_loss(ModulatedDenoiser(random_denoiser, recon), loss, x0)
    lrs = []
    result = train_edit(cfg, random_denoiser, recon, clip, x0,
                        on_step=lambda step, stats, lr: lrs.append(lr))
    after = _held_out_loss(ModulatedDenoiser(random_denoiser, result.rectifier), loss, x0)
    assert after < 0.9 * before, (before, after)
    history = [s.loss for s in result.history]
    assert np.mean(history[-10:]) < np.mean(history[:10]), history
    assert lrs[8] == pytest.approx(1e-3) and lrs[9] == pytest.approx(9e-4)  # x0.9 every 10
    assert lrs[-1] == pytest.approx(1e-3 * 0.9**3)
    assert result.num_images == 8 and len(result.history) == 30
    assert result.rectifier is not recon and not result.rectifier.training


def test_markovian_training_runs_and_is_selectable(random_denoiser, recon, clip):
    x0 = real_faces(4)
    cfg = AttributeConfig(source=ATTR.source, target=ATTR.target, steps=4, num_images=4,
                          batch_size=2, method="markovian")
    result = train_edit(cfg, random_denoiser, recon, clip, x0, MarkovianConfig(300, 3, 2))
    assert len(result.history) == 4 and all(np.isfinite(s.loss) for s in result.history)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(result.rectifier.state_dict().values(), recon.state_dict().values()))
    assert changed


def test_bad_attribute_settings_fail_early_and_name_the_value(random_denoiser, recon, clip, faces):
    with pytest.raises(ValueError, match="steps=0"):
        train_edit(AttributeConfig(target="x", steps=0), random_denoiser, recon, clip, faces)
    with pytest.raises(ValueError, match="same CLIP embedding"):
        train_edit(AttributeConfig(source="a face", target="a face"), random_denoiser, recon,
                   clip, faces)


# ----------------------------------------------------------------------------- editing
@pytest.mark.parametrize("mode, tol", [("lowrank", 1e-6), ("grouped", 5e-4)])
def test_edit_with_zero_offsets_returns_the_input(random_denoiser, faces, mode, tol):
    """Edit-friendly replay through an untrained (Delta = 0) rectifier is the reconstruction, up
    to float rounding of the modulated convs: exact zeros on the lowrank path (the plain conv);
    on the grouped path a grouped convolution, which oneDNN computes with other kernels than the
    plain one (per pass ~1e-6, amplified over the replay's 8 steps: up to 1.3e-4 on some CPUs of
    the same family). A trained rectifier's edit moves the image by far more."""
    torch.manual_seed(0)
    zero = build_rectifier(RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16,
                                           time_embed_dim=32, modulation=ModulationMode(mode)),
                           random_denoiser.unet)
    for skip in (0, 3):
        editor = Editor(random_denoiser, InversionConfig(num_steps=8, eta=1.0, skip=skip),
                        {"zero": zero, "trained": perturbed(zero)})
        out = editor.edit(faces, seeds=[0, 1, 2, 3], names=("reconstruction", "zero", "trained"))
        assert (out.outputs["reconstruction"] - faces).abs().max() <= 1e-5
        assert (out.outputs["zero"] - faces).abs().max().item() <= tol, skip
        assert (out.outputs["trained"] - faces).abs().mean() > 1e-3
        assert out.evaluations == {"inversion": 8, "reconstruction": 8 - skip,
                                   "zero": 8 - skip, "trained": 8 - skip}


def test_sdedit_with_an_untrained_rectifier_is_plain_sdedit(random_denoiser, faces):
    zero = build_rectifier(SMALL, random_denoiser.unet)
    editor = Editor(random_denoiser, InversionConfig(num_steps=10), reconstruction_rectifier=zero)
    plain = Editor(random_denoiser, InversionConfig(num_steps=10))
    a = editor.translate(faces, [5, 6, 7, 8], strength=0.5)
    b = plain.translate(faces, [5, 6, 7, 8], strength=0.5)
    assert (a - b).abs().max() <= 1e-4
    # seeded per image: image 2 alone is image 2 of the batch
    alone = editor.translate(faces[2:3], [7], strength=0.5)
    assert (alone - a[2:3]).abs().max() <= 1e-4
    # strength picks the start: low strength stays near the input, full strength does not
    low = sdedit(random_denoiser, random_denoiser.schedule, faces, 0.05, 10,
                 generator=torch.Generator().manual_seed(0))
    assert (low - faces).abs().mean() < 0.5 * (a - faces).abs().mean()
    with pytest.raises(ValueError, match="strength=0"):
        plain.translate(faces, [0, 1, 2, 3], strength=0.0)


def test_edit_rectifiers_load_from_the_stage_folders(random_denoiser, recon, tmp_path, faces):
    from hfedit.models.checkpoint import save_rectifier

    trained = perturbed(recon, scale=0.03, seed=4)
    save_rectifier(tmp_path / "smiling", trained, {"attribute": "smiling"})
    (tmp_path / ".tmp-old-123").mkdir()  # an interrupted publish is not an attribute
    (tmp_path / "status.json").write_text("{}")
    loaded = load_edit_rectifiers(tmp_path, random_denoiser.unet)
    assert list(loaded) == ["smiling"]
    a = ModulatedDenoiser(random_denoiser, trained)(faces, 300, faces)
    b = ModulatedDenoiser(random_denoiser, loaded["smiling"])(faces, 300, faces)
    assert torch.equal(a, b)
    with pytest.raises(KeyError, match=r"\['old'\].*have: \['smiling'\]"):
        load_edit_rectifiers(tmp_path, random_denoiser.unet, ["old"])


def test_cli_edit_writes_the_edited_image(random_denoiser, recon, tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from hfedit.models.backbone import save_backbone
    from hfedit.models.checkpoint import save_rectifier
    from hfedit.cli import main

    save_backbone(random_denoiser, tmp_path / "bb")
    Image.fromarray(data.astronaut()).save(tmp_path / "astro.jpg", quality=92)
    zero = build_rectifier(RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16,
                                           time_embed_dim=32, modulation=ModulationMode.lowrank),
                           random_denoiser.unet)
    save_rectifier(tmp_path / "edits" / "zero", zero, {"clip": {"semantic": False}})
    save_rectifier(tmp_path / "edits" / "smiling", perturbed(recon, 0.05), {"clip": {"semantic": True}})
    common = ["--backbone", str(tmp_path / "bb"), "--out", str(tmp_path / "out"), "--steps", "8",
              "--edits", str(tmp_path / "edits")]
    png = lambda name: np.asarray(Image.open(tmp_path / "out" / name), dtype=np.int16)  # noqa: E731
    assert main(["edit", str(tmp_path / "astro.jpg"), "--attribute", "zero", *common]) == 0
    captured = capsys.readouterr()
    assert "not semantic" in captured.err
    assert np.abs(png("astro_zero.png") - png("astro_input.png")).max() <= 1
    assert main(["edit", str(tmp_path / "astro.jpg"), "--attribute", "smiling", *common]) == 0
    assert np.abs(png("astro_smiling.png") - png("astro_input.png")).mean() > 1
    assert (tmp_path / "out" / "astro_smiling_pair.png").is_file()
    assert main(["edit", str(tmp_path / "astro.jpg"), "--attribute", "old", *common]) == 2
    assert "have: ['smiling', 'zero']" in capsys.readouterr().err


def test_edit_evaluation_scores_strength_and_fidelity(random_denoiser, recon, clip, faces):
    """No edit: no CLIP movement and perfect fidelity; a real change: lower fidelity. Faces of
    32 px are too small for the identity metric, which says so instead of guessing."""
    from hfedit.evaluation.edits import evaluate_edit

    zero = build_rectifier(RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16,
                                           time_embed_dim=32, modulation=ModulationMode.lowrank),
                           random_denoiser.unet)
    editor = Editor(random_denoiser, InversionConfig(num_steps=6),
                    {"zero": zero, "edit": perturbed(recon, 0.05)})
    direction = DirectionalClipLoss(clip, ATTR.source, ATTR.target)
    same = evaluate_edit(editor, "zero", faces, [0, 1, 2, 3], direction, None, batch_size=2,
                         identity_note="too small")
    s = same.summary()
    assert abs(s["clip_direction"]) < 1e-3 and s["l1"] < 1e-5 and s["ssim"] > 0.9999
    assert s["identity"] is None and s["identity_not_scored"] == {"not_scored": 4}
    edited = evaluate_edit(editor, "edit", faces, [0, 1, 2, 3], direction, None).summary()
    assert edited["l1"] > 1e-3 and edited["ssim"] < s["ssim"] and edited["images"] == 4
    manual = direction.clip_directional_similarity(
        faces, editor.edit(faces, [0, 1, 2, 3], names=("edit",)).outputs["edit"].clamp(-1, 1))
    assert edited["clip_direction"] == pytest.approx(manual.mean().item(), abs=1e-4)


# ------------------------------------------------------------------------ shared trunk
def test_shared_trunk_edit_trains_only_branches_and_stores_only_them(random_denoiser, recon, clip,
                                                                     tmp_path, faces):
    """``share_trunk``: the trunk and time MLP stay the reconstruction rectifier's, bit for bit;
    the edit's file holds the rest only and loads back (trunk from the base) to the same model."""
    from hfedit.models.checkpoint import load_rectifier, save_rectifier
    from hfedit.models.rectifier import SHARED_PREFIXES

    x0 = real_faces(4)
    cfg = AttributeConfig(source=ATTR.source, target=ATTR.target, steps=3, num_images=4,
                          batch_size=2, seed=0)
    rect = train_edit(cfg, random_denoiser, recon, clip, x0, share_trunk=True).rectifier
    before, after = recon.state_dict(), rect.state_dict()
    shared = [k for k in after if k.startswith(SHARED_PREFIXES)]
    assert shared and all(torch.equal(after[k], before[k]) for k in shared)
    assert any(not torch.equal(after[k], before[k]) for k in after if k not in shared)

    save_rectifier(tmp_path / "models" / "rectifier", recon)
    full, edit = tmp_path / "full", tmp_path / "models" / "edits" / "smiling"
    save_rectifier(full, rect)
    save_rectifier(edit, rect, {"attribute": "smiling"}, base=tmp_path / "models" / "rectifier")
    size = (edit / "rectifier.safetensors").stat().st_size
    assert size < 0.7 * (full / "rectifier.safetensors").stat().st_size
    meta = json.loads((edit / "rectifier.json").read_text())
    assert meta["base"]["path"] == "../../rectifier"  # relative: the folders move together
    loaded = load_edit_rectifiers(tmp_path / "models" / "edits", random_denoiser.unet)["smiling"]
    a = ModulatedDenoiser(random_denoiser, rect.eval())(faces, 300, faces)
    assert torch.equal(a, ModulatedDenoiser(random_denoiser, loaded)(faces, 300, faces))

    # a moved copy still loads when told where its base is; a different base is refused
    moved = tmp_path / "elsewhere" / "smiling"
    moved.parent.mkdir()
    edit.rename(moved)
    with pytest.raises(FileNotFoundError, match="shares its trunk.*missing"):
        load_rectifier(moved, random_denoiser.unet)
    loaded, _ = load_rectifier(moved, random_denoiser.unet, base=tmp_path / "models" / "rectifier")
    assert torch.equal(a, ModulatedDenoiser(random_denoiser, loaded)(faces, 300, faces))
    save_rectifier(tmp_path / "other", perturbed(recon, scale=0.01, seed=9))
    with pytest.raises(FileNotFoundError, match="retrain the edits"):
        load_rectifier(moved, random_denoiser.unet, base=tmp_path / "other")
    # a rectifier whose trunk was trained is not saved as if it shared the base's
    bad = copy.deepcopy(rect)
    with torch.no_grad():
        next(bad.trunk.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="shared tensors"):
        save_rectifier(tmp_path / "bad", bad, base=tmp_path / "models" / "rectifier")
