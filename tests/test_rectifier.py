"""The rectifier: identity when untrained, exact modulation paths, frozen backbone, targets."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import perturbed
from torch import nn

from hfedit.models.backbone import Denoiser
from hfedit.testing import celebahq256_unet
from hfedit.config import ModulationMode, RectifierConfig, RectifierTrunk, load_config
from hfedit.models.modulation import (
    ConvFactors,
    find_targets,
    load_target_patterns,
    modulated_conv,
    patterns_from_config,
)
from hfedit.models.rectifier import ModulatedDenoiser, Rectifier, modulated_eps, rectified_step
from hfedit.diffusion.schedule import Schedule, q_sample

PATHS = ["grouped", "loop", "lowrank"]
# A cheaper hypernetwork for the tests that are not about its default size.
SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)


def celebahq256_denoiser() -> Denoiser:
    """google/ddpm-ema-celebahq-256's UNet2DModel config, random weights (no download)."""
    return Denoiser(celebahq256_unet(), Schedule.linear(), "celebahq256-random").freeze()




def noisy(denoiser: Denoiser, x0: torch.Tensor, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor([999, 500, 40, 3][: x0.shape[0]])
    return q_sample(denoiser.schedule, x0, t, torch.randn(x0.shape, generator=gen)), t


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on the shared 2-core machine two OpenMP threads
    contending with other jobs made these tests 10x slower (110 s instead of 12 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def self_noise(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> float:
    """How far the backbone is from itself: batched pass vs one sample at a time. oneDNN picks
    other conv kernels by batch size and memory format (float32 rounding, ~2e-6 on the tiny
    backbone); a grouped or batch-1 conv with kernels equal to theta bit for bit differs by as
    much, so the identity tests allow 1e-6 on top of it."""
    with torch.no_grad():
        whole = denoiser(x_t, t)
        alone = torch.cat([denoiser(x_t[i : i + 1], t[i : i + 1]) for i in range(len(t))])
    return (whole - alone).abs().max().item()


@pytest.fixture(scope="module")
def rectifier(random_denoiser) -> Rectifier:
    """The default config (resnet34 trunk) on the tiny backbone, untrained."""
    torch.manual_seed(1)
    return Rectifier(RectifierConfig(), random_denoiser.unet)


@pytest.fixture(scope="module")
def small(random_denoiser) -> Rectifier:
    torch.manual_seed(2)
    return Rectifier(SMALL, random_denoiser.unet)


# ------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("mode", ["auto", *PATHS])
def test_untrained_rectifier_is_the_backbone(random_denoiser, rectifier, faces, mode):
    x_t, t = noisy(random_denoiser, faces)
    with torch.no_grad():
        step = rectified_step(random_denoiser, rectifier, x_t, t, faces, mode)
    assert all(bool((f.delta() == 0).all()) for f in step.factors.values())  # exactly
    if mode == "lowrank":  # the plain conv plus exact zeros: bit-identical
        assert torch.equal(step.eps_hat, step.eps_plain)
    else:
        err = (step.eps_hat - step.eps_plain).abs().max().item()
        assert err <= 1e-6 + self_noise(random_denoiser, x_t, t), (mode, err)


def test_untrained_rectifier_is_the_backbone_celebahq256(resolution: int = 64):
    """The paper's backbone architecture (63 targets), fed 64x64 inputs: the same modules and
    kernels as at 256x256, 16x cheaper on a CPU (256x256 passes too, in ~25 s)."""
    denoiser = celebahq256_denoiser()
    rect = Rectifier(RectifierConfig(), denoiser.unet)
    assert rect.num_targets == 63
    x0 = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_t, t = noisy(denoiser, x0)
    with torch.no_grad():
        step = rectified_step(denoiser, rect, x_t, t, x0)
    err = (step.eps_hat - step.eps_plain).abs().max().item()
    assert err <= 1e-6 + self_noise(denoiser, x_t, t), err


# ------------------------------------------------------------------------------ exactness
def test_every_path_equals_the_per_sample_loop(random_denoiser, small, faces):
    rect = perturbed(small)
    x_t, t = noisy(random_denoiser, faces)
    with torch.no_grad():
        ref = rectified_step(random_denoiser, rect, x_t, t, faces, "loop", reuse_prefix=False)
    deltas = [f.delta() for f in ref.factors.values()]
    # Delta is nonzero and differs between samples; the output is no longer the backbone's
    assert min(d.abs().mean().item() for d in deltas) > 1e-4
    assert min((d[0] - d[1]).abs().max().item() for d in deltas) > 1e-4
    assert (ref.eps_hat - ref.eps_plain).abs().max().item() > 1e-3
    for mode in ["auto", *PATHS]:
        for reuse in (True, False):
            with torch.no_grad():
                out = rectified_step(random_denoiser, rect, x_t, t, faces, mode, reuse).eps_hat
            err = (out - ref.eps_hat).abs().max().item()
            assert err <= 1e-5, (mode, reuse, err)


def test_every_path_has_the_loops_gradients(random_denoiser, small, faces):
    """Gradients of a loss with respect to the offsets agree across paths (training is exact)."""
    rect = perturbed(small)
    x_t, t = noisy(random_denoiser, faces)
    with torch.no_grad():
        factors = rect(faces, faces.flip(0), t)
    grads = {}
    for mode in PATHS:
        leaves = {n: ConvFactors(f.a.clone().requires_grad_(), f.b.clone().requires_grad_())
                  for n, f in factors.items()}
        modulated_eps(random_denoiser, leaves, x_t, t, mode).square().mean().backward()
        grads[mode] = torch.cat([torch.cat([f.a.grad.flatten(), f.b.grad.flatten()])
                                 for f in leaves.values()])
    scale = grads["loop"].abs().max().item()
    assert scale > 0
    for mode in ("grouped", "lowrank"):
        assert (grads[mode] - grads["loop"]).abs().max().item() <= 1e-5 * max(scale, 1.0), mode


def test_gradient_reaches_x_t_through_the_modulated_pass(random_denoiser, small, faces):
    """With x_t requiring grad (a Markovian chain) the down path is recomputed, not reused."""
    rect = perturbed(small)
    x_t, t = noisy(random_denoiser, faces)
    grads = []
    for reuse in (True, False):
        x = x_t.clone().requires_grad_()
        rectified_step(random_denoiser, rect, x, t, faces, reuse_prefix=reuse).eps_hat.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().max() > 0


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 1, 0, 1), ((3, 1), (2, 1), (1, 0), 1), (4, 2, 0, 1),
])
def test_conv_paths_respect_stride_padding_dilation(kernel, stride, padding, dilation):
    """Outputs and gradients (input, both factors, and the kernel when it trains) of every path
    against the definition, in float64."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation).double()
    kh, kw = conv.weight.shape[-2:]
    x0 = torch.randn(3, 5, 11, 9, generator=gen, dtype=torch.float64)
    f0 = [torch.randn(3, kh, kw, c, generator=gen, dtype=torch.float64) for c in (5, 7)]
    g = torch.randn(3, 7, *conv(x0).shape[-2:], generator=gen, dtype=torch.float64)

    def run(path):
        conv.zero_grad(set_to_none=True)
        x, a, b = (t.clone().requires_grad_() for t in (x0, *f0))
        if path == "definition":
            w = conv.weight * (1 + ConvFactors(a, b).delta())  # (B, C_out, C_in, kh, kw)
            y = torch.cat([nn.functional.conv2d(x[i : i + 1], w[i], conv.bias, conv.stride,
                                                conv.padding, conv.dilation) for i in range(3)])
        else:
            y = modulated_conv(conv, x, ConvFactors(a, b), path)
        (y * g).sum().backward()
        return [y, x.grad, a.grad, b.grad, conv.weight.grad, conv.bias.grad]

    ref = run("definition")
    for path in PATHS:
        for name, u, v in zip(["y", "dx", "da", "db", "dtheta", "dbias"], run(path), ref):
            assert (u - v).abs().max().item() <= 1e-10, (path, name)


# ------------------------------------------------------------------------- frozen backbone
def test_only_the_rectifier_trains_and_the_backbone_stays_bit_identical(random_denoiser, small,
                                                                        faces):
    before = {k: v.clone() for k, v in random_denoiser.unet.state_dict().items()}
    model = ModulatedDenoiser(random_denoiser, copy.deepcopy(small)).train()
    assert not random_denoiser.training
    assert not any(p.requires_grad for p in random_denoiser.parameters())
    opt = torch.optim.Adam(model.rectifier.parameters(), lr=1e-3, weight_decay=1e-5)
    x_t, t = noisy(random_denoiser, faces)
    eps = torch.randn(faces.shape, generator=torch.Generator().manual_seed(3))
    losses = []
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        loss = (model(x_t, t, faces) - eps).square().mean()  # paper eq. 3
        loss.backward()
        if i == 0:  # zero-initialised A heads still receive gradient: training starts
            assert all(h.weight.grad.abs().max() > 0 for h in model.rectifier.head_a)
        assert all(p.grad is None for p in random_denoiser.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] != losses[0]  # the rectifier changed the prediction
    after = random_denoiser.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # detached: no swapped forwards or leftover hooks; the plain pass is the plain pass
    for m in random_denoiser.unet.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks


def test_modulate_restores_the_backbone_after_an_error(random_denoiser, small, faces):
    factors = perturbed(small)(faces, faces, 10)
    bad = {**factors, small.target_names[0]: ConvFactors(*(f[:1] for f in factors[small.target_names[0]]))}
    with pytest.raises(ValueError, match="do not fit the input batch"):
        with torch.no_grad():
            modulated_eps(random_denoiser, bad, faces, 10)
    assert not any("forward" in m.__dict__ for m in random_denoiser.unet.modules())


# ------------------------------------------------------------------------------- structure
def test_targets_are_exactly_the_middle_and_up_convs(random_denoiser, small):
    convs = [n for n, m in random_denoiser.unet.named_modules() if isinstance(m, nn.Conv2d)]
    expected = [n for n in convs if n.startswith(("mid_block.", "up_blocks."))]
    assert list(small.target_names) == expected
    assert not any(n.startswith("down_blocks.") or n in ("conv_in", "conv_out")
                   for n in small.target_names)
    assert any("conv_shortcut" in n for n in expected) and any("upsamplers" in n for n in expected)


def test_offsets_of_a_sample_do_not_depend_on_the_rest_of_the_batch(small, faces):
    rect = perturbed(small)
    t = torch.tensor([999, 500, 40, 3])
    with torch.no_grad():
        whole = rect(faces, faces.roll(1, 0), t)
        alone = rect(faces[2:3], faces.roll(1, 0)[2:3], t[2:3])
    for name in rect.target_names:
        for u, v in zip(whole[name], alone[name]):
            assert (u[2:3] - v).abs().max().item() <= 1e-5


def test_channels_last_stem_computes_the_sequential_trunk(small, faces):
    """``features`` runs the stem in channels-last memory: the same trunk, float rounding apart,
    with and without gradients (the pretraining path), and an NCHW result for the branches."""
    x = torch.cat([faces, faces.flip(-1)], dim=1)
    with torch.no_grad():
        ref = small.trunk(x)
        got = small.features(x)
    assert got.is_contiguous()
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    small.zero_grad()
    small.features(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in small.trunk.named_parameters()}
    small.zero_grad()
    small.trunk(x).square().mean().backward()
    for n, p in small.trunk.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6), n
    small.zero_grad()


def test_kernels_built_by_one_gemm_are_the_reference_kernels():
    """The grouped path builds 1 + Delta as one batched GEMM over the taps (zeros off the tap
    diagonal), then times theta: the reference's values for 3x3, 1x1 and non-square kernels."""
    from hfedit.models.modulation import _ModulatedKernels, modulated_kernels

    gen = torch.Generator().manual_seed(0)
    for co, ci, kh, kw in [(8, 5, 3, 3), (6, 4, 1, 1), (3, 7, 1, 3)]:
        theta = torch.randn(co, ci, kh, kw, generator=gen)
        f = ConvFactors(torch.randn(4, kh, kw, ci, generator=gen),
                        torch.randn(4, kh, kw, co, generator=gen))
        got = _ModulatedKernels.compute(theta, f.a, f.b)
        ref = modulated_kernels(theta, f)
        assert got.shape == ref.shape and got.is_contiguous()
        assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_state_dict_round_trips_through_safetensors(random_denoiser, small, faces, tmp_path):
    from safetensors.torch import load_file, save_file

    rect = perturbed(small)
    save_file(rect.state_dict(), tmp_path / "r.safetensors")
    torch.manual_seed(123)
    other = Rectifier(SMALL, random_denoiser.unet)
    other.load_state_dict(load_file(tmp_path / "r.safetensors"))
    with torch.no_grad():
        a, b = rect(faces, faces, 7), other(faces, faces, 7)
    assert all(torch.equal(a[n].a, b[n].a) and torch.equal(a[n].b, b[n].b) for n in a)


def test_config_and_pattern_sets(tmp_path):
    cfg = load_config(overrides=["rectifier.trunk=resnet18", "rectifier.modulation=lowrank"])
    assert cfg.rectifier.trunk is RectifierTrunk.resnet18
    assert cfg.rectifier.modulation is ModulationMode.lowrank
    assert patterns_from_config(cfg.rectifier).matches("up_blocks.0.upsamplers.0.conv")
    with pytest.raises(ValueError, match="no such pattern set"):
        load_target_patterns("nope", cfg.rectifier.targets_file)
    only_mid = tmp_path / "t.yaml"
    only_mid.write_text("mid:\n  include: ['mid_block\\..*']\n  exclude: ['.*conv2']\n")
    unet = torch.nn.Module()
    unet.mid_block = nn.ModuleDict({"a": nn.Conv2d(2, 2, 3), "conv2": nn.Conv2d(2, 2, 3)})
    assert list(find_targets(unet, load_target_patterns("mid", only_mid))) == ["mid_block.a"]


def test_conditioned_denoiser_is_an_ordinary_denoiser(random_denoiser, small, faces):
    model = ModulatedDenoiser(random_denoiser, perturbed(small))
    d = model.conditioned(faces)
    x_t, t = noisy(random_denoiser, faces)
    with torch.no_grad():
        assert torch.equal(d(x_t, t), model(x_t, t, faces))
    assert d.schedule is random_denoiser.schedule
