"""The ablation's intervals (the paper's Fig. 6): each method on its own interval and on the
full one, the backbone alone beside them, exactly as configured."""

from __future__ import annotations

import warnings

import pytest
import torch

from hfedit.config import EditMode, load_config
from hfedit.evaluation.edits import ablation_intervals
from hfedit.diffusion.inversion import ddim_invert
from hfedit.diffusion.schedule import Schedule


@pytest.mark.parametrize("n, t0, skip, start", [(50, 500, 24, 500), (50, 510, 24, 500),
                                                (10, 350, 6, 300), (20, 0, 19, 0)])
def test_the_intervals_are_the_configured_ones(n, t0, skip, start):
    cfg = load_config(overrides=[f"inversion.num_steps={n}", "inversion.skip=2",
                                 f"edits.markovian.t0={t0}"])
    schedule = Schedule.linear()
    iv = ablation_intervals(cfg.inversion, cfg.edits.markovian.t0, schedule)
    top = schedule.timesteps(n)[0]
    sm, mk, bb = iv["score_matching"], iv["markovian"], iv["backbone"]
    # score matching: the configured inversion (mode, skip) and the same from x_T
    assert (sm["own"].mode, sm["own"].skip, sm["own"].num_steps) == ("edit_friendly", 2, n)
    assert (sm["full"].mode, sm["full"].skip, sm["full"].start) == ("edit_friendly", 0, top)
    # Markovian: DDIM from t0 (the largest grid timestep <= t0) and from x_T
    assert (mk["own"].mode, mk["own"].skip, mk["own"].start) == ("ddim", skip, start)
    assert (mk["full"].mode, mk["full"].skip, mk["full"].start) == ("ddim", 0, top)
    assert bb == {"score_matching": sm["own"], "markovian": mk["own"], "full": mk["full"]}
    inv = mk["own"].inversion(cfg.inversion)
    assert (inv.mode, inv.skip, inv.num_steps) == (EditMode.ddim, skip, n)
    assert inv.eta == cfg.inversion.eta and inv.seed == cfg.inversion.seed


def test_the_backbone_on_the_markovian_interval_samples_ddim_from_t0(random_denoiser, faces):
    """edit_ablation.evaluate with no rectifier on the Markovian's own interval: DDIM-invert
    with the backbone, DDIM-sample from t0 (done by hand here)."""
    from hfedit.models.clip import load_clip
    from hfedit.diffusion.schedule import posterior_mean
    from pipelines.edit_ablation import evaluate, intervals

    cfg = load_config(overrides=["inversion.num_steps=10", "edits.markovian.t0=300",
                                 "clip.model=ViT-S-32", "edits.ablation.attribute=smiling"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(cfg.clip)
    d, x0 = random_denoiser, faces[:2]
    iv = intervals(cfg, d.schedule)["backbone"]["markovian"]
    ev = evaluate(cfg, d, clip, None, None, iv, (x0, [0, 1]))
    ts = d.schedule.timesteps(10)
    x = ddim_invert(d, d.schedule, x0, 10).xts[iv.skip]
    assert ts[iv.skip] == 300
    for t, s in list(zip(ts, Schedule.prev_timesteps(ts)))[iv.skip:]:
        x = posterior_mean(d.schedule.step_coefficients(t, s, 0.0), x, d(x, t))
    assert torch.allclose(ev.edited, x.clamp(-1, 1), atol=1e-6, rtol=0)
    full = evaluate(cfg, d, clip, None, None, intervals(cfg, d.schedule)["backbone"]["full"],
                    (x0, [0, 1]))
    assert (full.edited - ev.edited).abs().max() > 1e-3  # another interval, another result
    assert ev.summary()["images"] == 2 and "l1_std" in ev.summary()
