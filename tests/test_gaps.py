"""The reconstruction gaps (hfedit/evaluation/reconstruction.py): PDAE's posterior-mean gap along the N-step
chain beside the noise gap, and every table's mean ± std over the images."""

from __future__ import annotations

import math

import pytest
import torch

from hfedit.evaluation.reconstruction import (
    mean_std,
    posterior_mean_gap,
    posterior_mean_gaps,
    reconstruct,
)
from hfedit.diffusion.schedule import Schedule

N = 10
SEEDS = [5, 6, 7]


def _oracle(schedule: Schedule, x0: torch.Tensor, shift: float = 0.0):
    """A model that knows x0: its prediction is the true noise of x_t (plus ``shift``)."""
    def model(x_t, t):
        a = schedule.abar(t)
        return (x_t - math.sqrt(a) * x0) / math.sqrt(1.0 - a) + shift
    return model


def test_posterior_mean_gap_is_zero_for_a_model_predicting_the_true_noise(faces):
    schedule = Schedule.linear()
    x0 = faces[:3].double()
    gap = posterior_mean_gap(_oracle(schedule, x0), schedule, x0, N, SEEDS)
    assert gap.shape == (3,) and gap.abs().max() < 1e-20


@pytest.mark.parametrize("final_alpha", [1.0, None])
def test_posterior_mean_gap_is_the_noise_gap_weighted_by_c_t_squared(faces, final_alpha):
    """A prediction off by a constant d everywhere: mu~ - mu_theta = c_t d with
    c_t = sqrt(abar_s) sqrt(1 - abar_t) / sqrt(abar_t) - sqrt(1 - abar_s) (eta = 1)."""
    schedule = Schedule.linear(final_alpha_cumprod=final_alpha)
    x0, d = faces[:3].double(), 0.1
    gap = posterior_mean_gap(_oracle(schedule, x0, d), schedule, x0, N, SEEDS)
    ts = schedule.timesteps(N)
    expected = 0.0
    for t, s in zip(ts, Schedule.prev_timesteps(ts)):
        c = schedule.step_coefficients(t, s, 1.0)
        c_t = c.sqrt_abar_s * c.sqrt_one_minus_abar_t / c.sqrt_abar_t - c.dir_coef
        expected += (c_t * d) ** 2 / N
    assert torch.allclose(gap, torch.full((3,), expected, dtype=torch.float64), rtol=1e-9)


def test_posterior_mean_gaps_do_not_depend_on_the_batching(random_denoiser, faces):
    rows = [posterior_mean_gaps(random_denoiser, faces[:3], [4], seed=2, batch_size=b)[0]
            for b in (1, 3)]
    assert rows[0]["images"] == rows[1]["images"] == 3 and rows[0]["mean"] > 0
    assert rows[0]["mean"] == pytest.approx(rows[1]["mean"], rel=1e-5)
    assert rows[0]["std"] == pytest.approx(rows[1]["std"], rel=1e-4)


def test_mean_std_is_over_the_finite_images():
    assert mean_std(torch.tensor([1.0, 2.0, 3.0, math.nan])) == {"mean": 2.0, "std": 1.0, "images": 3}
    assert mean_std(torch.tensor([4.0])) == {"mean": 4.0, "std": 0.0, "images": 1}


def test_reconstruction_rows_carry_std_and_image_count(random_denoiser, faces):
    from hfedit.evaluation import metrics as M
    from hfedit.diffusion.inversion import ddim_invert, ddim_sample

    d, x0 = random_denoiser, faces[:3]
    out = reconstruct(d, x0, 4, batch_size=2)
    rec = ddim_sample(d, d.schedule, ddim_invert(d, d.schedule, x0, 4).xts[0], 4).clamp(-1, 1)
    l1 = M.l1(x0, rec)
    assert out["ddim"]["images"] == 3
    assert out["ddim"]["l1"] == pytest.approx(float(l1.mean()), rel=1e-4)
    assert out["ddim"]["l1_std"] == pytest.approx(float(l1.std()), rel=1e-3)
    assert out["ddim"]["l1_std"] > 0
