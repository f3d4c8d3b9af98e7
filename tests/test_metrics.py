"""Image metrics against hand values and scikit-image; identity similarity on real faces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfedit.evaluation import metrics
from hfedit.evaluation.identity import IdentityScorer, dlib_models_dir


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1]."""
    return torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    from skimage import data

    return _to_tensor(data.astronaut())  # (1, 3, 512, 512), face ~88 px


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    import matplotlib.cbook as cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        rgb = np.asarray(im.convert("RGB"))  # (600, 512, 3)
    return _to_tensor(rgb[44:556])  # (1, 3, 512, 512), face ~200 px


def _jitter(x: torch.Tensor) -> torch.Tensor:
    """Shift by a few pixels, rescale by ~3 %, add a little noise: the same face."""
    h, w = x.shape[-2:]
    crop = x[..., 9 : h - 6, 4 : w - 11]
    y = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    return (y + 0.02 * noise).clamp(-1, 1)


# ------------------------------------------------------------------------ pixel metrics
def test_l1_l2_psnr_hand_values():
    ref = torch.full((2, 3, 4, 4), -1.0)  # 0 in [0, 1]
    res = ref.clone()
    res[0] = 0.0  # 0.5 everywhere in [0, 1]
    res[1, :, :2] = 1.0  # half the pixels at 1.0
    assert torch.allclose(metrics.l1(ref, res), torch.tensor([0.5, 0.5]))
    assert torch.allclose(metrics.l2(ref, res), torch.tensor([0.25, 0.5]))
    expected = torch.tensor([10 * math.log10(1 / 0.25), 10 * math.log10(1 / 0.5)])
    assert torch.allclose(metrics.psnr(ref, res), expected)


def test_psnr_of_identical_images_is_capped_at_100db(astronaut):
    out = metrics.psnr(astronaut, astronaut.clone())
    assert out.tolist() == [metrics.PSNR_MAX_DB] == [100.0]


def test_squared_difference_is_the_mean_squared_difference_per_sample():
    eps = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pred = eps + torch.tensor([0.0, 0.5, 2.0]).view(3, 1, 1, 1)
    assert torch.allclose(metrics.squared_difference(eps, pred), torch.tensor([0.0, 0.25, 4.0]))


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape"):
        metrics.l1(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"at least 11x11"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_ssim_matches_skimage_on_real_images(astronaut, grace_hopper):
    from skimage.metrics import structural_similarity

    small = F.interpolate(torch.cat([astronaut, grace_hopper]), size=96, mode="area")  # (2,3,96,96)
    noisy = (small + 0.15 * torch.randn(small.shape, generator=torch.Generator().manual_seed(2)))
    pairs = [(small, noisy), (small, small.flip(0)), (small, _jitter(small))]
    for ref, res in pairs:
        ours = metrics.ssim(ref, res)
        for i in range(ref.shape[0]):
            a = ((ref[i] + 1) / 2).permute(1, 2, 0).double().numpy()
            b = ((res[i] + 1) / 2).permute(1, 2, 0).double().numpy()
            theirs = structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                data_range=1.0, channel_axis=2,
            )
            assert abs(float(ours[i]) - theirs) < 1e-4, (float(ours[i]), theirs)
    assert torch.allclose(metrics.ssim(small, small), torch.ones(2), atol=1e-6)


def test_ssim_is_differentiable():
    ref = torch.rand(1, 3, 32, 32) * 2 - 1
    res = (ref + 0.1 * torch.randn_like(ref)).requires_grad_(True)
    metrics.ssim(ref, res).sum().backward()
    assert res.grad is not None and torch.isfinite(res.grad).all() and res.grad.abs().sum() > 0


def test_lpips_reports_missing_weights_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ok, reason = metrics.lpips_available()
    assert not ok
    assert reason.startswith(f"LPIPS weights not found at {tmp_path}")
    assert "TORCH_HOME" in reason
    with pytest.raises(RuntimeError, match="LPIPS weights not found"):
        metrics.lpips(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    assert list(tmp_path.iterdir()) == []  # nothing fetched
    assert "lpips" not in metrics.reconstruction_metrics(torch.zeros(1, 3, 16, 16),
                                                         torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------ identity
@pytest.fixture(scope="module")
def scorer() -> IdentityScorer:
    dlib_models_dir()  # found by path, without importing face_recognition_models
    return IdentityScorer()


def test_identity_same_face_scores_higher_than_different_faces(scorer, astronaut, grace_hopper):
    ref = torch.cat([astronaut, astronaut, grace_hopper, grace_hopper])
    res = torch.cat([_jitter(astronaut), grace_hopper, _jitter(grace_hopper), astronaut])
    scores = scorer.score(ref, res)
    sim = scores.similarity
    assert scores.reasons == [None] * 4 and torch.isfinite(sim).all()
    assert sim[0] > max(sim[1], sim[3]) and sim[2] > max(sim[1], sim[3])
    # dlib's own convention: the same person lies below distance 0.6, different people above
    assert scores.distance[0] < 0.6 and scores.distance[2] < 0.6 and scores.distance[1] > 0.6
    assert torch.allclose(scorer(astronaut, astronaut), torch.ones(1), atol=1e-5)


def test_identity_at_256px_with_upsampling(scorer, astronaut, grace_hopper):
    """At 256x256 the astronaut's face is ~45 px: found by upsampling the detector once."""
    ref = F.interpolate(torch.cat([astronaut, grace_hopper]), size=256, mode="area")
    res = torch.cat([_jitter(ref[:1]), ref[:1]])
    sim = scorer.similarity(ref, res)
    assert torch.isfinite(sim).all() and sim[0] > sim[1]


def test_identity_is_nan_with_a_reason_without_a_face(scorer, astronaut):
    from skimage import data

    tiny = F.interpolate(astronaut, size=32, mode="area")
    scores = scorer.score(tiny, tiny)
    assert torch.isnan(scores.similarity).all() and scores.reasons == ["too_small:reference"]

    coffee = _to_tensor(data.coffee())[..., :400, :400]
    scores = scorer.score(torch.cat([astronaut[..., :400, :400], coffee]),
                          torch.cat([coffee, astronaut[..., :400, :400]]))
    assert torch.isnan(scores.similarity).all()
    assert scores.reasons == ["no_face:result", "no_face:reference"]
    assert math.isnan(metrics.mean_finite(scores.similarity))
