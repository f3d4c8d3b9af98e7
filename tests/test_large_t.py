"""Algorithm 1 at large t (hfedit/training/edits.py, ``edits.attributes.<a>.large_t``): the
paper's objective as written, CLIP's input clamped, the sqrt(abar_t) weighting, a t-range."""

from __future__ import annotations

import pytest
import torch

from hfedit.models.clip import directional_loss
from hfedit.config import AttributeConfig, LargeT
from hfedit.training.edits import EditLoss, ScoreMatchingObjective, train_edit
from hfedit.models.rectifier import ModulatedDenoiser
from hfedit.diffusion.schedule import predict_x0, q_sample
from tests.conftest import perturbed
from tests.test_edit_training import ATTR, SMALL, clip, one_thread, recon  # noqa: F401

T_BIG = [999, 900, 50, 0]  # per image: large t where P_t amplifies the rectifier's error


def _objective(random_denoiser, recon, clip, large_t):  # noqa: F811
    from hfedit.models.clip import DirectionalClipLoss

    model = ModulatedDenoiser(random_denoiser, perturbed(recon, 0.05, seed=4))
    loss = EditLoss(DirectionalClipLoss(clip, ATTR.source, ATTR.target))
    return ScoreMatchingObjective(model, loss, large_t), model, loss


def _draws(faces):
    t = torch.tensor(T_BIG)
    eps = torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))
    return t, eps


@torch.no_grad()
def _beside_the_paper(random_denoiser, recon, clip, faces, remedy):  # noqa: F811
    """(the paper's output, the remedy's mean loss, the remedy's output, model, loss) on the
    same draws."""
    none, model, loss = _objective(random_denoiser, recon, clip, LargeT.none)
    other, _, _ = _objective(random_denoiser, recon, clip, remedy)
    t, eps = _draws(faces)
    _, a = none(faces, t, eps)
    total, b = other(faces, t, eps)
    return a, total, b, model, loss


def test_the_papers_objective_lets_clip_see_images_far_outside_the_data_range(
        random_denoiser, recon, clip, faces):  # noqa: F811
    obj, model, loss = _objective(random_denoiser, recon, clip, LargeT.none)
    t, eps = _draws(faces)
    with torch.no_grad():
        _, out = obj(faces, t, eps)
        step = model.step(q_sample(model.schedule, faces, t, eps), t, faces)
        x0_edit = predict_x0(model.schedule, q_sample(model.schedule, faces, t, eps), t, step.eps_hat)
    assert torch.allclose(out.x0_edit, x0_edit, atol=1e-5)
    peak = out.x0_edit.abs().flatten(1).amax(1)
    assert peak[0] > 10 * peak[3] and peak[0] > 5  # t = 999 vs t = 0


def test_clamp_gives_clip_the_clamped_image_and_l1_the_unclamped_one(random_denoiser, recon, clip,
                                                                     faces):  # noqa: F811
    a, _, b, _, loss = _beside_the_paper(random_denoiser, recon, clip, faces, LargeT.clamp)
    with torch.no_grad():
        src = loss.source_embedding(faces)
        want = directional_loss(src, loss.clip.encode_image(a.x0_edit.clamp(-1, 1)),
                                loss.direction.text_direction)
    assert torch.equal(a.x0_edit, b.x0_edit) and torch.equal(a.terms.l1, b.terms.l1)
    assert torch.allclose(b.terms.direction, want, atol=1e-6)
    assert not torch.allclose(a.terms.direction, b.terms.direction, atol=1e-4)


def test_weight_scales_each_images_loss_by_sqrt_abar_t(random_denoiser, recon, clip, faces):  # noqa: F811
    a, total, _, model, _ = _beside_the_paper(random_denoiser, recon, clip, faces, LargeT.weight)
    w = model.schedule.alphas_cumprod[torch.tensor(T_BIG)].sqrt().float()
    assert torch.allclose(total, (a.terms.total * w).mean(), rtol=1e-5)
    assert w[0] < 0.01 < 0.99 < w[3]


def test_range_draws_t_below_t_max_only(random_denoiser, recon, clip, monkeypatch):  # noqa: F811
    import hfedit.training.edits as et

    seen = []
    real = et.sample_training_inputs

    def spy(x0, num_train_timesteps, generator):
        t, eps = real(x0, num_train_timesteps, generator)
        seen.append((num_train_timesteps, t))
        return t, eps

    monkeypatch.setattr(et, "sample_training_inputs", spy)
    cfg = AttributeConfig(source=ATTR.source, target=ATTR.target, steps=3, num_images=4,
                          batch_size=2, large_t=LargeT.range, t_max=7)
    from tests.conftest import real_faces

    train_edit(cfg, random_denoiser, recon, clip, real_faces(4))
    assert len(seen) == 3 and all(n == 7 and int(t.max()) < 7 for n, t in seen)
    with pytest.raises(ValueError, match="t_max=0"):
        train_edit(AttributeConfig(target="x", large_t=LargeT.range, t_max=0), random_denoiser,
                   recon, clip, real_faces(4))
