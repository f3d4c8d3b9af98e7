"""The Denoiser adapter, save/load in the diffusers layout, tiny DDPM training and resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hfedit.models.backbone import BackboneUnavailable, load_backbone, new_denoiser, save_backbone
from hfedit.training.backbone import train_backbone
from tests.conftest import RES, real_faces


def _train_cfg(tiny_cfg, **train):
    t = dataclasses.replace(tiny_cfg.backbone.train, **train)
    return dataclasses.replace(tiny_cfg.backbone, train=t)


def test_save_and_load_round_trip_is_exact(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    d = new_denoiser(tiny_cfg.backbone, RES)
    save_backbone(d, tmp_path / "bb", meta={"note": "test"})
    assert (tmp_path / "bb" / "model_index.json").is_file()
    loaded = load_backbone(tmp_path / "bb")
    # bit for bit at every batch size: the loaded weights get aligned memory of their own
    # (oneDNN's kernels for the unaligned tensors from_pretrained leaves differ by ~1e-6 at B=1)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.unet.parameters())
    for x, t in [(torch.randn(2, 3, RES, RES), torch.tensor([3, 700])),
                 (torch.randn(1, 3, RES, RES), torch.tensor([500]))]:
        assert torch.equal(d(x, t), loaded(x, t))
    assert torch.equal(loaded.schedule.alphas_cumprod, d.schedule.alphas_cumprod)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_unreachable_sources_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable, match=r"backbone.source='google/ddpm-ema-celebahq-256'.*offline"):
        load_backbone("google/ddpm-ema-celebahq-256")
    with pytest.raises(BackboneUnavailable, match=r"backbone.source=.*no such folder"):
        load_backbone(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneUnavailable, match="UNet2DModel"):
        load_backbone(tmp_path / "empty")


def test_training_lowers_the_loss(tiny_cfg, tmp_path):
    cfg = _train_cfg(tiny_cfg, steps=60, log_every=10, warmup_steps=5, checkpoint_every=1000)
    result = train_backbone(cfg, real_faces(32), tmp_path, show_progress=False)
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.6 * first, result.losses


def test_interrupted_training_resumes_bit_identically(tiny_cfg, tmp_path):
    cfg = _train_cfg(tiny_cfg, steps=6, log_every=1, checkpoint_every=3, warmup_steps=2, batch_size=4)
    images = real_faces(8)
    straight = train_backbone(cfg, images, tmp_path / "a", show_progress=False)

    def crash(metrics, step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_backbone(cfg, images, tmp_path / "b", log=crash, show_progress=False)
    resumed = train_backbone(cfg, images, tmp_path / "b", show_progress=False)
    assert resumed.resumed_from == 3
    for (name, a), b in zip(straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.losses == straight.losses


def test_changed_config_does_not_resume(tiny_cfg, tmp_path):
    cfg = _train_cfg(tiny_cfg, steps=3, checkpoint_every=3, batch_size=4)
    train_backbone(cfg, real_faces(8), tmp_path, show_progress=False)
    other = _train_cfg(tiny_cfg, steps=3, checkpoint_every=3, batch_size=4, lr=5e-4)
    assert train_backbone(other, real_faces(8), tmp_path, show_progress=False).resumed_from == 0
    assert train_backbone(other, real_faces(8), tmp_path, show_progress=False).resumed_from == 3
