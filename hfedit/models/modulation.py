"""Per-sample modulation of a frozen U-Net's conv kernels (paper 2312.15707, eq. 2).

For a target conv with kernel ``theta`` (C_out, C_in, kh, kw) and sample b of the batch

    theta_hat_b = theta * (1 + Delta_b),    Delta_b[o, i, h, w] = A_b[h, w, i] * B_b[h, w, o]

(the paper's separable offsets: per kernel tap an outer product of a ``C_in`` and a ``C_out``
vector). The bias is not modulated. Targets are found by walking ``unet.named_modules()`` with
the name patterns of ``conf/rectifier_targets.yaml``; :func:`modulate` swaps their ``forward``
for the duration of a ``with`` block and restores it, so the backbone's weights are never written
and its blocks are never copied.

Three exact ways to run a conv with per-sample kernels (:class:`ModulationMode`):

* ``grouped``: one conv with ``groups=B`` over the (1, B*C_in, H, W) input and the materialised
  kernels (B*C_out, C_in, kh, kw) (a 1x1 conv: one ``bmm``; B=1: the plain conv);
* ``loop``: one conv per sample, plain autograd (the reference);
* ``lowrank``: no per-sample kernel at all. Because every tap's offset is rank one,

      conv(x, theta_hat_b) = conv(x, theta) + sum_{h,w} B_b[h,w] * (theta[:, :, h, w] @ (A_b[h,w] * x_{h,w}))

  where ``x_{h,w}`` is the input window that tap (h, w) reads (the zero-padded input shifted by
  ``(h, w) * dilation`` and subsampled by the stride): the plain conv plus, per tap, a 1x1 conv
  with the shared weight ``theta[:, :, h, w]`` of the per-input-channel scaled input, scaled per
  output channel.

``auto`` is ``grouped`` (:func:`resolve_mode`). Memory: ``grouped`` and ``loop`` build the
per-sample kernels, B x (the targets' kernel sizes) floats, and keep them for backward;
``lowrank`` builds none, at about twice the conv FLOPs plus per-tap elementwise work.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable
from torch import Tensor, nn

from hfedit.config import ModulationMode, RectifierConfig, project_root


# ------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class TargetPatterns:
    """Regexes (``re.fullmatch``) over qualified module names: include minus exclude."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.include) and not any(
            re.fullmatch(p, name) for p in self.exclude
        )


def _resolve_file(path: str) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for root in (project_root(), Path(__file__).resolve().parents[2]):
        if (root / p).is_file():
            return root / p
    return project_root() / p


def load_target_patterns(name: str, file: str | Path) -> TargetPatterns:
    """The pattern set ``name`` of the YAML ``file`` (see ``conf/rectifier_targets.yaml``)."""
    from omegaconf import OmegaConf

    path = _resolve_file(str(file))
    if not path.is_file():
        raise FileNotFoundError(f"rectifier.targets_file='{file}': no such file ({path})")
    sets = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(sets, dict) or name not in sets:
        known = sorted(sets) if isinstance(sets, dict) else []
        raise ValueError(f"rectifier.targets='{name}': no such pattern set in {path} (known: {known})")
    entry = sets[name] or {}
    unknown = set(entry) - {"include", "exclude"}
    include, exclude = entry.get("include") or [], entry.get("exclude") or []
    if unknown or not include or not all(isinstance(p, str) for p in [*include, *exclude]):
        raise ValueError(
            f"{path}: pattern set '{name}' must be {{include: [regex, ...], exclude: [regex, ...]}} "
            f"with a non-empty include list (got keys {sorted(entry)})"
        )
    for p in [*include, *exclude]:
        re.compile(p)  # raises re.error naming the bad pattern
    return TargetPatterns(tuple(include), tuple(exclude))


def patterns_from_config(cfg: RectifierConfig) -> TargetPatterns:
    return load_target_patterns(cfg.targets, cfg.targets_file)


def find_targets(unet: nn.Module, patterns: TargetPatterns) -> dict[str, nn.Conv2d]:
    """Every ``nn.Conv2d`` of ``unet`` whose qualified name matches, in ``named_modules`` order."""
    found: dict[str, nn.Conv2d] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Conv2d) or not patterns.matches(name):
            continue
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"target conv '{name}': only groups=1, padding_mode='zeros' and integer padding "
                f"are supported (got groups={module.groups}, padding_mode={module.padding_mode!r}, "
                f"padding={module.padding!r}); exclude it in the pattern set"
            )
        found[name] = module
    if not found:
        raise ValueError(f"no nn.Conv2d of the backbone matches the target patterns {patterns}")
    return found


# ------------------------------------------------------------------------------------ factors
class ConvFactors(NamedTuple):
    """The separable offset of one conv for a batch: ``Delta[b,o,i,h,w] = a[b,h,w,i] * b[b,h,w,o]``.

    ``a``: (B, kh, kw, C_in); ``b``: (B, kh, kw, C_out).
    """

    a: Tensor
    b: Tensor

    def delta(self) -> Tensor:
        """The dense offsets, (B, C_out, C_in, kh, kw)."""
        return torch.einsum("bhwi,bhwo->boihw", self.a, self.b)


def modulated_kernels(weight: Tensor, f: ConvFactors) -> Tensor:
    """``theta * (1 + Delta_b)`` per sample, (B, C_out, C_in, kh, kw), by plain autograd ops
    (the reference the faster paths are tested against)."""
    return weight.unsqueeze(0) * (1.0 + f.delta())


class _ModulatedKernels(torch.autograd.Function):
    """``theta * (1 + Delta_b)`` per sample, in two passes over the (B, C_out, C_in, kh, kw)
    result (a batched GEMM for ``1 + Delta``, then times theta); backward keeps only theta, A, B
    (no per-sample tensor):
    with ``G = dL/dtheta_hat * theta``: ``dL/dA[b,h,w,i] = sum_o G[b,o,i,h,w] B[b,h,w,o]``,
    ``dL/dB[b,h,w,o] = sum_i G[b,o,i,h,w] A[b,h,w,i]``, ``dL/dtheta = sum_b dL/dtheta_hat (1 + Delta_b)``.
    """

    @staticmethod
    def compute(theta: Tensor, a: Tensor, b: Tensor) -> Tensor:
        # ``1 + Delta_b`` in the conv's (C_out, C_in * kh * kw) layout as one batched GEMM over
        # the k = kh*kw taps, then times theta in place: two passes over the B kernels, both
        # contiguous. ``e[b, s, i, t] = A_b[s, i]`` if s == t else 0, so
        # ``(B_b^T e_b)[o, (i, t)] = B_b[t, o] A_b[t, i] = Delta_b[o, i, t]`` (the other k - 1
        # terms are exact zeros). Cost O(B * C_out * C_in * k^2) multiply-adds, k times the
        # elementwise form's, but in GEMM kernels: the broadcasting form (theta * B) * A runs,
        # in the conv's layout, an innermost loop over a kw-element tap row only.
        bsz, kh, kw, c_in = a.shape
        c_out, k = b.shape[-1], kh * kw
        # no autocast: Delta must not be rounded to bf16 before the 1 is added (as the
        # rectifier's branch bank, hfedit.models.rectifier)
        with torch.autocast(a.device.type, enabled=False):
            taps = torch.arange(k, device=a.device)
            e = a.new_zeros(bsz, k, c_in, k)
            e[:, taps, :, taps] = a.reshape(bsz, k, c_in).transpose(0, 1)  # (k, B, C_in) placed
            one = a.new_ones(()).expand(bsz, c_out, c_in * k)
            w = torch.baddbmm(one, b.reshape(bsz, k, c_out).transpose(1, 2), e.view(bsz, k, -1))
        return w.mul_(theta.reshape(c_out, c_in * k)).view(bsz, c_out, c_in, kh, kw)

    @staticmethod
    def forward(ctx, theta: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(theta, a, b)
        return _ModulatedKernels.compute(theta, a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # g: (B, C_out, C_in, kh, kw)
        theta, a, b = ctx.saved_tensors
        g_delta = g * theta  # dL/dDelta
        grad_theta = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = torch.einsum("boihw,bhwo->bhwi", g_delta, b)
        if ctx.needs_input_grad[2]:
            grad_b = torch.einsum("boihw,bhwi->bhwo", g_delta, a)
        if ctx.needs_input_grad[0]:
            grad_theta = g.sum(0) + torch.einsum("boihw,bhwi,bhwo->oihw", g, a, b)
        return grad_theta, grad_a, grad_b


# -------------------------------------------------------------------------------- conv paths
def _check(conv: nn.Conv2d, x: Tensor, f: ConvFactors, name: str) -> None:
    c_out, c_in, kh, kw = conv.weight.shape
    bsz = x.shape[0]
    if f.a.shape != (bsz, kh, kw, c_in) or f.b.shape != (bsz, kh, kw, c_out):
        raise ValueError(
            f"modulation of '{name}': factors a{tuple(f.a.shape)} b{tuple(f.b.shape)} do not fit "
            f"the input batch {bsz} and kernel {tuple(conv.weight.shape)}; expected "
            f"a{(bsz, kh, kw, c_in)} b{(bsz, kh, kw, c_out)}"
        )


def conv_loop(conv: nn.Conv2d, x: Tensor, f: ConvFactors) -> Tensor:
    """Reference: one conv per sample with its own kernel, plain autograd."""
    w = modulated_kernels(conv.weight, f)  # (B, C_out, C_in, kh, kw)
    return torch.cat(
        [F.conv2d(x[i : i + 1], w[i], conv.bias, conv.stride, conv.padding, conv.dilation)
         for i in range(x.shape[0])]
    )


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def conv_grouped(conv: nn.Conv2d, x: Tensor, f: ConvFactors) -> Tensor:
    """One conv with ``groups=B``: the batch folded into channels."""
    bsz, c_in, h, w_ = x.shape
    theta = conv.weight
    if _needs_grad(theta, f.a, f.b):
        w = _ModulatedKernels.apply(theta, f.a, f.b)  # (B, C_out, C_in, kh, kw)
    else:
        w = _ModulatedKernels.compute(theta, f.a, f.b)
    if bsz == 1:
        return F.conv2d(x, w[0], conv.bias, conv.stride, conv.padding, conv.dilation)
    if w.shape[-2:] == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        # a 1x1 conv is a matmul per sample: one bmm (torch runs a grouped 1x1 conv on the CPU
        # as a loop over groups)
        y = torch.bmm(w.view(bsz, w.shape[1], c_in), x.reshape(bsz, c_in, h * w_))  # (B, C_out, HW)
        if conv.bias is not None:
            y = y + conv.bias[:, None]
        return y.view(bsz, -1, h, w_)
    bias = None if conv.bias is None else conv.bias.expand(bsz, -1).reshape(-1)  # (B*C_out,)
    y = F.conv2d(x.reshape(1, bsz * c_in, h, w_), w.flatten(0, 1), bias, conv.stride,
                 conv.padding, conv.dilation, groups=bsz)  # (1, B*C_out, H', W')
    return y.view(bsz, -1, *y.shape[-2:])


def _window(xp: Tensor, i: int, j: int, geom: tuple, out_hw: tuple[int, int]) -> Tensor:
    """What tap (i, j) reads of the zero-padded input for every output position: a strided view
    (B, C_in, H', W') of ``xp``."""
    (sh, sw), (dh, dw) = geom[0], geom[2]
    h_out, w_out = out_hw
    return xp[:, :, i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
              j * dw : j * dw + sw * (w_out - 1) + 1 : sw]


def _pad(x: Tensor, geom: tuple) -> Tensor:
    ph, pw = geom[1]
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x  # (B, C_in, H+2ph, W+2pw)


class _LowRankCorrection(torch.autograd.Function):
    """``sum_{h,w} B[h,w] * (theta[:, :, h, w] @ (A[h,w] * x_{h,w}))``: what the offsets add to
    ``conv(x, theta)``. Saves only x, A, B (no per-tap tensor); backward recomputes per tap."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, theta: Tensor, geom: tuple,
                out_hw: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, a, b, theta)
        ctx.geom, ctx.out_hw = geom, out_hw
        xp = _pad(x, geom)
        out = x.new_zeros(x.shape[0], theta.shape[0], *out_hw)  # (B, C_out, H', W')
        for i in range(theta.shape[2]):
            for j in range(theta.shape[3]):
                aw = _window(xp, i, j, geom, out_hw) * a[:, i, j, :, None, None]  # (B, C_in, H', W')
                u = F.conv2d(aw, theta[:, :, i : i + 1, j : j + 1])  # (B, C_out, H', W')
                out.addcmul_(u, b[:, i, j, :, None, None])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # g: (B, C_out, H', W')
        x, a, b, theta = ctx.saved_tensors
        geom, out_hw = ctx.geom, ctx.out_hw
        need_x, need_a, need_b, need_theta = ctx.needs_input_grad[:4]
        xp = _pad(x, geom)
        gxp = torch.zeros_like(xp) if need_x else None
        ga = torch.zeros_like(a) if need_a else None
        gb = torch.zeros_like(b) if need_b else None
        gtheta = torch.zeros_like(theta) if need_theta else None
        for i in range(theta.shape[2]):
            for j in range(theta.shape[3]):
                win = _window(xp, i, j, geom, out_hw)  # (B, C_in, H', W')
                a_t, b_t = a[:, i, j, :, None, None], b[:, i, j, :, None, None]
                gbt = g * b_t  # (B, C_out, H', W')
                th = theta[:, :, i, j]  # (C_out, C_in)
                if need_x or need_a:
                    v = F.conv2d(gbt, th.t()[:, :, None, None])  # theta_t^T (B_t g): (B, C_in, H', W')
                    if need_a:
                        ga[:, i, j] = torch.einsum("bihw,bihw->bi", v, win)
                    if need_x:
                        _window(gxp, i, j, geom, out_hw).addcmul_(v, a_t)
                if need_b or need_theta:
                    aw = win * a_t
                    if need_b:
                        u = F.conv2d(aw, th[:, :, None, None])  # (B, C_out, H', W')
                        gb[:, i, j] = torch.einsum("bohw,bohw->bo", g, u)
                    if need_theta:
                        gtheta[:, :, i, j] = torch.einsum("bohw,bihw->oi", gbt, aw)
        gx = None
        if need_x:
            ph, pw = geom[1]
            gx = gxp[:, :, ph : gxp.shape[2] - ph, pw : gxp.shape[3] - pw]
        return gx, ga, gb, gtheta, None, None


def conv_lowrank(conv: nn.Conv2d, x: Tensor, f: ConvFactors) -> Tensor:
    """Plain conv plus one shared-weight 1x1 conv per tap; no per-sample kernel."""
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    geom = (conv.stride, conv.padding, conv.dilation)
    return y + _LowRankCorrection.apply(x, f.a, f.b, conv.weight, geom, tuple(y.shape[-2:]))


_PATHS = {
    ModulationMode.loop: conv_loop,
    ModulationMode.grouped: conv_grouped,
    ModulationMode.lowrank: conv_lowrank,
}


def resolve_mode(mode: ModulationMode | str) -> ModulationMode:
    """The concrete path of ``mode``: ``auto`` is ``grouped``, on every device and batch size.

    ``grouped`` runs the convs as batched library calls (one grouped conv, or one ``bmm`` for a
    1x1 conv, per target; at B = 1 the very conv the loop runs), not a Python loop over the
    batch. Its per-sample kernels ((B, C_out, C_in, kh, kw) per target, kept for backward:
    B x 74.5M floats for the CelebA-HQ-256 U-Net's 63 targets) are what ``lowrank`` avoids:
    choose ``lowrank`` explicitly when they do not fit in memory.
    """
    mode = ModulationMode(mode)
    if mode is not ModulationMode.auto:
        return mode
    return ModulationMode.grouped


def modulated_conv(conv: nn.Conv2d, x: Tensor, f: ConvFactors, mode: ModulationMode | str,
                   name: str = "conv") -> Tensor:
    """``conv`` applied to ``x`` with the per-sample kernels ``theta * (1 + Delta_b)``."""
    _check(conv, x, f, name)
    return _PATHS[resolve_mode(mode)](conv, x, f)


# ------------------------------------------------------------------------------ attach/detach
def _swap_forward(module: nn.Module, forward, name: str) -> None:
    if "forward" in module.__dict__:
        raise RuntimeError(f"module '{name}' already has its forward swapped (nested modulate())")
    module.forward = forward  # an instance attribute shadowing the class method; not state


@contextmanager
def modulate(unet: nn.Module, factors: Mapping[str, ConvFactors],
             mode: ModulationMode | str = ModulationMode.auto,
             reuse: Mapping[str, object] | None = None,
             checkpoint: bool = False) -> Iterator[nn.Module]:
    """Within the block, every conv named in ``factors`` runs with its per-sample kernels.

    Swaps the named convs' ``forward`` and deletes the swap on exit, also on error. Parameters,
    buffers and hooks of ``unet`` are not touched, so its ``state_dict`` stays bit-identical.
    ``reuse``: outputs recorded by :func:`record_prefix` on a plain pass over the *same*
    ``(x_t, t)``; those modules return them instead of recomputing (exact: they ran before any
    target, so nothing they saw depends on the modulation). Not re-entrant, not thread-safe for
    a module shared between threads.
    ``checkpoint``: activation checkpointing of every top-level block that holds targets (for a
    diffusers U-Net: the mid block and each up block): the block keeps only its inputs, and its
    modulated forward runs again in the backward pass (a checkpointed block modulates itself,
    so the recomputation is the modulated one even after this ``with`` block has exited).
    Same values and gradients; less activation memory for about one more forward.
    """
    mode = ModulationMode(mode)
    swapped: list[nn.Module] = []
    blocks = _checkpointed_blocks(unet, factors) if checkpoint else {}
    try:
        for block_name, inner in blocks.items():
            block = unet.get_submodule(block_name)

            def run_block(*args, _block=block, _inner=inner, **kwargs):
                def run(*a, **k):  # runs again in the backward pass: modulates itself
                    with modulate(_block, _inner, mode):
                        return type(_block).forward(_block, *a, **k)
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

            _swap_forward(block, run_block, block_name)
            swapped.append(block)
        in_blocks = {f"{b}.{n}" for b, inner in blocks.items() for n in inner}
        for name, f in factors.items():
            if name in in_blocks:
                continue
            conv = unet.get_submodule(name)
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"modulation target '{name}' is a {type(conv).__name__}, not Conv2d")

            def forward(x: Tensor, _conv=conv, _f=f, _name=name) -> Tensor:
                return modulated_conv(_conv, x, _f, mode, _name)

            _swap_forward(conv, forward, name)
            swapped.append(conv)
        for name, output in (reuse or {}).items():
            if any(t == name or t.startswith(name + ".") for t in factors):
                raise ValueError(f"cannot reuse the output of '{name}': it contains a target conv")
            module = unet.get_submodule(name)
            _swap_forward(module, lambda *args, _out=output, **kwargs: _out, name)
            swapped.append(module)
        yield unet
    finally:
        for module in swapped:
            del module.forward


def _checkpointed_blocks(unet: nn.Module,
                         factors: Mapping[str, ConvFactors]) -> dict[str, dict[str, ConvFactors]]:
    """``{top-level block: {target name inside it: factors}}`` for the blocks that hold targets
    (targets that are top-level modules themselves are modulated without checkpointing)."""
    blocks: dict[str, dict[str, ConvFactors]] = {}
    for block, _ in _prefix_candidates(unet):
        inner = {n[len(block) + 1:]: f for n, f in factors.items() if n.startswith(block + ".")}
        if inner:
            blocks[block] = inner
    return blocks


def _prefix_candidates(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Top-level modules of ``unet``, looking through ModuleList/ModuleDict containers."""
    stack = list(unet.named_children())[::-1]
    while stack:
        name, module = stack.pop()
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            stack.extend((f"{name}.{n}", m) for n, m in list(module.named_children())[::-1])
        else:
            yield name, module


@contextmanager
def record_prefix(unet: nn.Module, targets: Sequence[str]) -> Iterator[dict[str, object]]:
    """Record, during one plain pass, the outputs of the top-level modules that finish before
    the first target conv starts (for a U-Net modulated in its middle and up blocks: the time
    embedding, ``conv_in`` and every down block, about half of a pass).

    Their inputs depend on ``(x_t, t)`` only, so a modulated pass over the same ``(x_t, t)`` may
    :func:`modulate` with ``reuse=`` these outputs. Modules called more than once are dropped.
    """
    targets = list(targets)
    outputs: dict[str, object] = {}
    calls: dict[str, int] = {}
    state = {"target_started": False}
    handles = []

    def on_target(module, args) -> None:
        state["target_started"] = True

    def on_output(name: str):
        def hook(module, args, output) -> None:
            calls[name] = calls.get(name, 0) + 1
            if not state["target_started"]:
                outputs[name] = output
        return hook

    try:
        for name in targets:
            handles.append(unet.get_submodule(name).register_forward_pre_hook(on_target))
        for name, module in _prefix_candidates(unet):
            if not any(t == name or t.startswith(name + ".") for t in targets):
                handles.append(module.register_forward_hook(on_output(name)))
        yield outputs
    finally:
        for h in handles:
            h.remove()
        for name in [n for n in outputs if calls.get(n, 0) != 1]:
            del outputs[name]


__all__ = [
    "ConvFactors",
    "ModulationMode",
    "TargetPatterns",
    "conv_grouped",
    "conv_loop",
    "conv_lowrank",
    "find_targets",
    "load_target_patterns",
    "modulate",
    "modulated_conv",
    "modulated_kernels",
    "patterns_from_config",
    "record_prefix",
    "resolve_mode",
]
