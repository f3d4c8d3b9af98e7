"""Directional CLIP loss: the formula, the loading paths of CLIP, gradients, caching.

Most tests use a tiny open_clip architecture registered from a JSON config (same classes and
tokenizer as ViT-B-32, 2 layers); one test builds the real default ViT-B-32. Nothing downloads.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from hfedit.models.clip import (
    ClipWeightsError,
    DirectionalClipLoss,
    RandomClipWarning,
    directional_loss,
    load_clip,
)
from hfedit.config import ClipConfig, HfeditConfig

TINY = "hfedit-test-tiny-clip"
SRC, TAR = "a photo of a face", "a photo of a smiling face"


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    """Register a 2-layer CLIP (the ViT-B-32 classes, 64x64 input) with open_clip."""
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                       "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                     "layers": 2},
    }
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY


@pytest.fixture(scope="module")
def tiny_clip(tiny_name):
    with pytest.warns(RandomClipWarning):
        return load_clip(ClipConfig(model=tiny_name, seed=3))


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- the formula
def test_directional_loss_matches_hand_computation():
    src = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tar = torch.tensor([[1.0, 2.0, 2.0], [3.0, 1.0, 4.0]])
    text = torch.tensor([0.0, 3.0, 4.0])
    # rows: d_I = (0, 2, 2) and (3, 0, 4); d_T / |d_T| = (0, 0.6, 0.8)
    expected = torch.tensor([1 - (1.2 + 1.6) / math.sqrt(8), 1 - 3.2 / 5])
    assert torch.allclose(directional_loss(src, tar, text), expected)


def test_directional_loss_is_0_aligned_1_orthogonal_2_opposite():
    src = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(8, generator=torch.Generator().manual_seed(1))
    ortho = torch.randn(8, generator=torch.Generator().manual_seed(2))
    ortho = ortho - (ortho @ text) / (text @ text) * text
    tar = torch.stack([src[0] + 0.3 * text, src[1] - 2 * text, src[2] + ortho, src[3]])
    loss = directional_loss(src, tar, text)
    assert torch.allclose(loss, torch.tensor([0.0, 2.0, 1.0, 1.0]), atol=1e-6)


def test_directional_loss_has_finite_gradients_when_the_image_does_not_move():
    src = torch.zeros(2, 4, requires_grad=True)
    tar = torch.zeros(2, 4, requires_grad=True)
    loss = directional_loss(src, tar, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    loss.sum().backward()
    assert torch.allclose(loss, torch.ones(2)) and torch.isfinite(tar.grad).all()


# ------------------------------------------------------------------------------- the model
def test_random_clip_warns_and_is_not_semantic(tiny_name, caplog):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="hfedit.models.clip"):
        with pytest.warns(RandomClipWarning, match="CLIP has random weights: edits are not sem"):
            clip = load_clip(ClipConfig(model=tiny_name, seed=3))
    assert torch.equal(torch.rand(3), before)  # the global RNG is untouched
    assert "CLIP has random weights: edits are not semantic" in caplog.text
    assert clip.semantic is False and "random" in clip.weights_note
    with pytest.warns(RandomClipWarning):
        again = load_clip(ClipConfig(model=tiny_name, seed=3))
    x = _images(2)
    assert torch.equal(clip.encode_image(x), again.encode_image(x))  # seeded
    with pytest.raises(ClipWeightsError, match=r"clip\.weights is empty and clip\.allow_random"):
        load_clip(ClipConfig(model=tiny_name, allow_random=False))


def test_default_config_is_the_papers_vit_b_32_built_offline():
    cfg = HfeditConfig().clip
    assert (cfg.model, cfg.weights) == ("ViT-B-32", "")
    with pytest.warns(RandomClipWarning):
        clip = load_clip(cfg)
    assert clip.semantic is False and clip.image_size == (224, 224)
    assert torch.allclose(clip.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    # a constant image stays constant through the resize: preprocessing = (c - mean) / std
    grey = torch.zeros(1, 3, 32, 48)  # 0.5 in [0, 1]; not square: resize + centre crop
    pre = clip.preprocess(grey)
    assert pre.shape == (1, 3, 224, 224)
    assert torch.allclose(pre, ((0.5 - clip.mean) / clip.std).expand_as(pre), atol=1e-5)
    text = clip.encode_text([SRC, TAR])  # the BPE vocabulary ships inside open_clip
    assert text.shape == (2, 512) and torch.allclose(text.norm(dim=-1), torch.ones(2))


def test_gradients_flow_from_the_loss_to_the_edited_image(tiny_clip):
    loss_fn = DirectionalClipLoss(tiny_clip, SRC, TAR)
    src = _images(2, seed=1)
    edit = (src + 0.2 * _images(2, seed=2)).requires_grad_(True)
    loss = loss_fn(edit, src)
    assert loss.shape == (2,) and ((loss >= 0) & (loss <= 2)).all()
    loss.sum().backward()
    assert edit.grad is not None and torch.isfinite(edit.grad).all()
    assert (edit.grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.grad is None for p in tiny_clip.parameters())  # CLIP stays frozen
    sim = loss_fn.clip_directional_similarity(src, edit.detach())
    assert torch.allclose(sim, 1 - loss.detach(), atol=1e-4)  # MHA fast path: ~1e-7 apart


def test_text_direction_is_computed_once(tiny_clip, monkeypatch):
    calls = []
    encode = tiny_clip.encode_text
    monkeypatch.setattr(tiny_clip, "encode_text", lambda t: calls.append(t) or encode(t))
    loss_fn = DirectionalClipLoss(tiny_clip, [SRC, "a face"], TAR)
    direction = loss_fn.text_direction.clone()
    for seed in range(3):
        loss_fn(_images(1, seed=seed), _images(1, seed=seed + 10))
    assert len(calls) == 1 and torch.equal(loss_fn.text_direction, direction)
    assert torch.allclose(direction.norm(), torch.tensor(1.0))


def test_clip_stays_in_eval_mode_inside_a_training_module(tiny_clip):
    holder = torch.nn.Module()
    holder.loss = DirectionalClipLoss(tiny_clip, SRC, TAR)
    holder.train()
    assert not tiny_clip.training and not tiny_clip.model.training


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_local_weights_file_round_trips(tiny_name, tiny_clip, tmp_path, suffix):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_clip(ClipConfig(model=tiny_name, weights=str(path), seed=99))
    assert loaded.semantic is True and str(path) in loaded.weights_note
    x = _images(2, seed=5)
    assert torch.equal(loaded.encode_image(x), tiny_clip.encode_image(x))
    assert torch.equal(loaded.encode_text([SRC]), tiny_clip.encode_text([SRC]))


def test_bad_weights_fail_naming_the_setting(tiny_name, tmp_path):
    with pytest.raises(ClipWeightsError, match=r"clip\.weights='/no/such/c\.safetensors': no such"):
        load_clip(ClipConfig(model=tiny_name, weights="/no/such/c.safetensors"))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ClipWeightsError, match=r"clip\.weights=.*cannot load it"):
        load_clip(ClipConfig(model=tiny_name, weights=str(garbage)))
    with pytest.raises(ClipWeightsError, match=r"clip\.weights='opnai'.*known tags: \['openai'"):
        load_clip(ClipConfig(model="ViT-B-32", weights="opnai"))
    with pytest.raises(ClipWeightsError, match=r"clip\.model='ViT-Q-99'"):
        load_clip(ClipConfig(model="ViT-Q-99"))


def test_pretrained_tag_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    if not huggingface_hub.is_offline_mode():
        pytest.skip("HF_HUB_OFFLINE is not set: the hub would be retried for ~45 s")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ClipWeightsError) as err:
        load_clip(ClipConfig(model="ViT-B-32", weights="openai"))
    message = str(err.value)
    assert message.startswith("clip.weights='openai': cannot fetch the open_clip weights")
    assert "timm/vit_base_patch32_clip_224.openai" in message and "local path" in message


def test_a_random_clip_is_announced_once_not_by_every_load(caplog):
    """open_clip's own "No pretrained weights loaded" is dropped (hfedit says it, with the
    setting to change); announce=False (a stage's tasks, after the driver) says nothing."""
    import logging
    import warnings as w

    cfg = ClipConfig(model="ViT-S-32", weights="")
    with caplog.at_level(logging.WARNING), w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        load_clip(cfg, announce=False)
    assert not seen and not caplog.records
    with caplog.at_level(logging.WARNING), pytest.warns(RandomClipWarning):
        load_clip(cfg)
    assert [r.name for r in caplog.records] == ["hfedit.models.clip"]
