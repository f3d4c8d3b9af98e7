"""One device and precision policy: resolution, Ray placement, autocast that keeps the
inversion exact, and activation checkpointing that changes memory and nothing else."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import perturbed, real_faces
from hfedit.config import ConfigError, RectifierConfig, RectifierTrunk, load_config
from hfedit.device import (DeviceUnavailable, Precision, check_precision, placement,
                           resolve_device, wants_gpu)
from hfedit.diffusion.inversion import invert, per_image_noise, replay
from hfedit.training.memory import saved_for_backward
from hfedit.models.rectifier import ModulatedDenoiser, Rectifier
from hfedit.diffusion.schedule import q_sample
from hfedit.training.reconstruction import ReconstructionObjective

SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fp32_backbone(random_denoiser):
    """The session's denoiser is shared: every test leaves it at fp32."""
    yield
    random_denoiser.precision = Precision.fp32


# ------------------------------------------------------------------------------ resolution
@pytest.mark.skipif(not NO_GPU, reason="asserts what a machine without a CUDA device answers; "
                                        "a GPU machine is covered by the placement tests below")
def test_auto_is_the_cpu_here_and_cuda_is_refused_with_the_setting_named():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceUnavailable, match=r"runtime.device='cuda'.*auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable, match=r"runtime.device='cuda:1'"):
        placement("cuda:1", "fp32", "editing")


def test_a_malformed_device_fails_at_config_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"runtime.device='gpu0'.*auto, cpu, cuda"):
        load_config(overrides=["runtime.device=gpu0"])
    with pytest.raises(ConfigError, match=r"runtime.precision"):
        load_config(overrides=["runtime.precision=fp8"])
    assert load_config(overrides=["runtime.device=cuda:3"]).runtime.device == "cuda:3"


def test_ray_workers_ask_for_gpus_only_when_the_device_policy_says_so():
    assert not wants_gpu("cpu", 8) and not wants_gpu("auto", 0)
    assert wants_gpu("auto", 1) and wants_gpu("cuda", 2)
    with pytest.raises(DeviceUnavailable, match="the Ray cluster has no GPUs"):
        wants_gpu("cuda", 0)


def test_task_and_actor_gpus_follow_runtime_device(monkeypatch):
    import pipelines.ray_runtime as rr

    cfg = load_config(overrides=["edit_batch.actors=4"])
    monkeypatch.setattr(rr, "cluster_gpus", lambda: 2.0)
    assert rr.task_placement(cfg) == ("cuda", 1.0)
    assert rr.actor_gpus(cfg) == 0.5  # 2 GPUs shared by 4 actors
    cfg.runtime.device = "cpu"
    assert rr.task_placement(cfg) == ("cpu", 0.0) and rr.actor_gpus(cfg) == 0.0
    monkeypatch.setattr(rr, "cluster_gpus", lambda: 0.0)
    cfg.runtime.device = "auto"
    assert rr.task_placement(cfg) == ("cpu", 0.0) and rr.actor_gpus(cfg) == 0.0


def test_fp16_training_is_refused_with_the_allowed_precisions():
    with pytest.raises(ValueError, match=r"runtime.precision=fp16 is not allowed for training "
                                         r"\(allowed: fp32, bf16\)"):
        check_precision("fp16", "training", torch.device("cpu"))
    assert check_precision("fp16", "editing", torch.device("cpu")) is Precision.fp16


# ------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_edit_friendly_reconstruction_exact(random_denoiser, precision):
    """Under autocast the U-Net really runs in the low dtype (its output differs from fp32),
    yet the maps, computed in float32 from what the model predicted, replay exactly."""
    d = random_denoiser
    rect = perturbed(Rectifier(SMALL, d.unet), scale=0.05)
    x0 = real_faces(2)
    noise = per_image_noise([0, 1], 6, x0.shape[1:])
    outs = {}
    for prec in ("fp32", precision):
        d.precision = Precision(prec)
        model = ModulatedDenoiser(d, rect).conditioned(x0)
        with torch.no_grad():
            inv = invert(model, d.schedule, x0, 6, noise=noise)
            rec = replay(model, d.schedule, inv)
            eps = d(x0, 500)
        assert eps.dtype == torch.float32 and inv.zs.dtype == torch.float32
        assert (rec - x0).abs().max().item() <= 1e-5, prec
        outs[prec] = eps
    gap = (outs[precision] - outs["fp32"]).abs().max().item()
    assert 1e-5 < gap < 0.1, gap  # autocast is on, and close to fp32


def test_bf16_training_gradient_points_where_fp32_does(random_denoiser):
    d = random_denoiser
    x0 = real_faces(2)
    t = torch.tensor([700, 30])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    grads = {}
    for prec in ("fp32", "bf16"):
        d.precision = Precision(prec)
        torch.manual_seed(0)
        rect = perturbed(Rectifier(SMALL, d.unet), scale=0.05)
        loss, _ = ReconstructionObjective(ModulatedDenoiser(d, rect))(x0, t, eps)
        loss.backward()
        grads[prec] = torch.cat([p.grad.flatten() for p in rect.parameters() if p.grad is not None])
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0).item()
    assert cos > 0.98, (cos, grads["fp32"].norm(), grads["bf16"].norm())


# ----------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_same_gradients_less_saved_memory(random_denoiser):
    """Checkpointed modulated blocks recompute their modulated forward in backward: the loss
    and every rectifier gradient are bit-identical, and autograd keeps fewer bytes."""
    d = random_denoiser
    base = perturbed(Rectifier(SMALL, d.unet), scale=0.05)
    x0 = real_faces(2)
    t = torch.tensor([500, 20])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = q_sample(d.schedule, x0, t, eps)
    results = {}
    for checkpoint in (False, True):
        rect = copy.deepcopy(base)
        md = ModulatedDenoiser(d, rect, "grouped", checkpoint=checkpoint)
        with saved_for_backward(d, rect) as saved:
            loss = (md(x_t, t, x0) - eps).pow(2).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in rect.parameters() if p.grad is not None])
        results[checkpoint] = (loss.detach(), grads, saved.bytes)
    assert torch.equal(results[False][0], results[True][0])
    assert torch.equal(results[False][1], results[True][1])
    assert results[True][2] < 0.8 * results[False][2], (results[True][2], results[False][2])


def test_each_process_takes_the_cpus_it_was_given(monkeypatch):
    """Thread policy: runtime.torch_threads when set, else OMP_NUM_THREADS (what Ray gives a
    task or actor), else the process's CPUs; the count is applied to torch."""
    import os

    import torch

    from hfedit.device import allotted_cpus, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert allotted_cpus() == (1, "OMP_NUM_THREADS")
        assert set_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        count, why = allotted_cpus()
        assert 1 <= count <= len(os.sched_getaffinity(0)) and why != "OMP_NUM_THREADS"
    finally:
        torch.set_num_threads(before)
