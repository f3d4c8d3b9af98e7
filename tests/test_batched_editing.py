"""One replay for B images x K attributes (hfedit/editing/editor.py): the batched path against the
one-image-one-attribute path, exact reconstruction through it, the passes each conditioning
makes (counted on the U-Net), and the determinism contract (same batch: identical; other batch
sizes: within 1e-5).

The batched and the one-by-one paths are the same math: in float64 they agree to 1e-12. In
float32 they differ by the rounding of batched CPU convs, which is not batch-invariant: the
plain tiny U-Net alone gives eps differing by ~1e-6 between batch 4 and batch 1, and a replay
carries that to ~1e-6 (skip >= N/4) .. ~1e-5 (skip 0) at the end (measured with the trained
backbone; ~1e-4 at skip 0 with random weights, whose first steps amplify it). The float32
checks use the trained backbone.
"""

from __future__ import annotations


import pytest
import torch

from hfedit.config import Conditioning, InversionConfig, RectifierConfig, RectifierTrunk
from hfedit.editing.editor import Editor
from hfedit.diffusion.inversion import replay, shift_maps
from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier, modulated_eps
from hfedit.diffusion.schedule import predict_x0
from tests.conftest import perturbed

SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)
SEEDS = [11, 12, 13, 14]
NAMES = ("reconstruction", "smiling", "old")
BOTH = [Conditioning.trajectory, Conditioning.live]


@pytest.fixture(scope="module")
def rects(random_denoiser):
    torch.manual_seed(0)
    base = build_rectifier(SMALL, random_denoiser.unet)
    return {"smiling": perturbed(base, 0.05, seed=1), "old": perturbed(base, 0.05, seed=2)}


@pytest.fixture(scope="module")
def float64(random_denoiser, rects, faces):
    """The random backbone, the rectifiers and two faces in float64 (slow convs: few of them)."""
    import copy

    return (copy.deepcopy(random_denoiser).double(),
            {n: copy.deepcopy(r).double() for n, r in rects.items()}, faces[:2].double())


def _editor(denoiser, rects, skip=0, steps=8, condition=Conditioning.trajectory) -> Editor:
    return Editor(denoiser, InversionConfig(num_steps=steps, skip=skip, condition=condition), rects)


def _one_by_one(d, rect, x0, inv, skip, condition):
    """The reference: one image, one attribute, the rectifier called step by step (live: the
    pre-existing ModulatedDenoiser path; trajectory: P_t of the inversion's kept estimates)."""
    if rect is None:
        return replay(d, d.schedule, inv, skip=skip)
    if condition is Conditioning.live:
        return replay(ModulatedDenoiser(d, rect).conditioned(x0), d.schedule, inv, skip=skip)

    def eps(x_t, t):
        i = inv.timesteps.index(t)
        return modulated_eps(d, rect(x0, predict_x0(d.schedule, inv.xts[i], t, inv.eps[i]), t), x_t, t)

    return replay(eps, d.schedule, inv, skip=skip)


def _check_against_one_by_one(d, rects, faces, skip, condition, tol, steps=8):
    editor = _editor(d, rects, skip, steps, condition=condition)
    batch = editor.edit(faces, SEEDS[:faces.shape[0]], NAMES)
    assert batch.condition is condition
    for b in range(faces.shape[0]):
        inv = editor.invert(faces[b:b + 1], [SEEDS[b]])
        for name in NAMES:
            ref = _one_by_one(d, editor.rectifier(name), faces[b:b + 1], inv, skip, condition)
            err = (batch.outputs[name][b:b + 1] - ref).abs().max().item()
            assert err <= tol, (name, b, err)
    # the reconstruction is the input; the attributes moved it, each its own way
    assert (batch.outputs["reconstruction"] - faces).abs().max() <= 1e-5
    for name in ("smiling", "old"):
        assert (batch.outputs[name] - faces).abs().mean() > 1e-3
    assert (batch.outputs["smiling"] - batch.outputs["old"]).abs().mean() > 1e-3


@pytest.mark.parametrize("condition", BOTH)
def test_b_by_k_in_one_replay_is_the_one_image_one_attribute_math(float64, condition):
    d, rects, faces = float64
    _check_against_one_by_one(d, rects, faces, 1, condition, tol=1e-12, steps=5)


@pytest.mark.parametrize("condition", BOTH)
def test_b_by_k_in_one_replay_equals_one_image_one_attribute_float32(trained_denoiser, rects,
                                                                     faces, condition):
    _check_against_one_by_one(trained_denoiser, rects, faces, 2, condition, tol=1e-5)


@pytest.mark.parametrize("condition", BOTH)
def test_reconstruction_through_the_batched_path_is_exact(random_denoiser, trained_denoiser, rects,
                                                          faces, condition):
    """``reconstruction`` beside attributes is the backbone's replay of the inverted batch:
    exact even with random weights. An untrained rectifier in the joint batch (kernels
    ``theta * (1 + 0)``, run as per-sample kernels) gives the input back within 1e-5."""
    for skip in (0, 3):
        editor = _editor(random_denoiser, rects, skip, condition=condition)
        batch = editor.edit(faces, SEEDS, ("smiling", "reconstruction", "old"))
        assert list(batch.outputs) == ["smiling", "reconstruction", "old"]
        assert (batch.outputs["reconstruction"] - faces).abs().max() <= 1e-5
    zero = build_rectifier(SMALL, trained_denoiser.unet)
    editor = _editor(trained_denoiser, {**rects, "zero": zero}, 2, condition=condition)
    batch = editor.edit(faces, SEEDS, ("smiling", "zero", "reconstruction"))
    assert (batch.outputs["zero"] - faces).abs().max() <= 1e-5
    assert (batch.outputs["reconstruction"] - faces).abs().max() <= 1e-5


class PassCounter:
    """Counts U-Net forwards, split by whether the target convs are modulated at the time."""

    def __init__(self, unet, targets):
        self.plain = self.modulated = 0
        convs = [unet.get_submodule(n) for n in targets]

        def hook(module, args):
            if any("forward" in c.__dict__ for c in convs):  # modulate() swapped their forward
                self.modulated += 1
            else:
                self.plain += 1
        self.handle = unet.register_forward_pre_hook(hook)


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(lambda m, a: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("skip", [0, 2])
def test_trajectory_conditioning_makes_one_modulated_pass_per_step_and_no_plain_one(
        random_denoiser, rects, faces, skip):
    d, steps = random_denoiser, 6
    editor = _editor(d, rects, skip, steps=steps)
    inv = editor.invert(faces, SEEDS)
    unet = PassCounter(d.unet, rects["smiling"].target_names)
    hyper = {n: CallCounter(r) for n, r in rects.items()}
    names = ("smiling", "old")
    try:
        traj = editor.edit(faces, SEEDS, names, inversion=inv)
        assert (unet.plain, unet.modulated) == (0, steps - skip)
        assert {n: c.calls for n, c in hyper.items()} == {"smiling": 1, "old": 1}
        assert (traj.passes.plain, traj.passes.modulated, traj.passes.hypernetwork) == (0, steps - skip, 2)
        unet.plain = unet.modulated = 0
        live = editor.edit(faces, SEEDS, names, inversion=inv, condition="live")
        assert (unet.plain, unet.modulated) == (steps - skip, steps - skip)
        assert {n: c.calls for n, c in hyper.items()} == {"smiling": 1 + steps - skip,
                                                          "old": 1 + steps - skip}
        assert (live.passes.plain, live.passes.modulated) == (steps - skip, steps - skip)
        unet.plain = unet.modulated = 0  # reconstruction beside them: the backbone's own replay
        both = editor.edit(faces, SEEDS, ("reconstruction", *names), inversion=inv)
        assert (unet.plain, unet.modulated) == (steps - skip, steps - skip)
        assert (both.passes.plain, both.passes.modulated) == (steps - skip, steps - skip)
    finally:
        unet.handle.remove()
        for c in hyper.values():
            c.handle.remove()
    # the two conditionings are different edits (same first step, then the trajectories part)
    assert (traj.outputs["smiling"] - live.outputs["smiling"]).abs().max() > 1e-5
    assert traj.evaluations == live.evaluations == {"inversion": 0, **{n: steps - skip for n in names}}


def test_trajectory_without_kept_estimates_recomputes_them(random_denoiser, rects, faces):
    """Maps changed by shift_maps no longer carry the backbone's estimates: the edit evaluates
    them first, batched (N plain evaluations per image), and gets what kept ones would give."""
    d = random_denoiser
    editor = _editor(d, rects)
    inv = shift_maps(editor.invert(faces, SEEDS), 0, 0)  # same maps, estimates dropped
    assert inv.eps is None
    fresh = editor.edit(faces, SEEDS, ("smiling",), inversion=inv)
    kept = editor.edit(faces, SEEDS, ("smiling",))
    assert fresh.passes.plain == 8 and kept.passes.plain == 0
    assert (fresh.outputs["smiling"] - kept.outputs["smiling"]).abs().max() <= 1e-5


def _across_batch_sizes(editor, faces, tol):
    first = editor.edit(faces, SEEDS[:faces.shape[0]], NAMES)
    again = editor.edit(faces, SEEDS[:faces.shape[0]], NAMES)
    for name in NAMES:
        assert torch.equal(first.outputs[name], again.outputs[name]), name
    pieces = {1: list(faces.split(1)), 3: list(faces.split(3))}
    for size, parts in pieces.items():
        outs, start = {n: [] for n in NAMES}, 0
        for part in parts:
            got = editor.edit(part, SEEDS[start:start + part.shape[0]], NAMES)
            start += part.shape[0]
            for n in NAMES:
                outs[n].append(got.outputs[n])
        for n in NAMES:
            err = (torch.cat(outs[n]) - first.outputs[n]).abs().max().item()
            assert err <= tol, (size, n, err)
    # the other attributes requested beside it do not change an attribute's edit either
    alone = editor.edit(faces, SEEDS[:faces.shape[0]], ("old",))
    assert (alone.outputs["old"] - first.outputs["old"]).abs().max() <= tol


@pytest.mark.parametrize("condition", BOTH)
def test_determinism_same_batch_identical_other_batch_sizes_within_1e_5(trained_denoiser, rects,
                                                                         faces, condition):
    _across_batch_sizes(_editor(trained_denoiser, rects, 2, condition=condition), faces, 1e-5)


@pytest.mark.slow  # float64 convs are slow; the float32 test above covers the contract
@pytest.mark.parametrize("condition", BOTH)
def test_determinism_across_batch_sizes_is_exact_math(float64, condition):
    d, rects, faces = float64
    _across_batch_sizes(_editor(d, rects, 0, 5, condition=condition), faces, 1e-12)


def test_hypernetwork_chunks_do_not_change_the_edit(float64):
    from hfedit.editing.joint import JointRectifier

    d, rects, faces = float64
    editor = _editor(d, rects, steps=5)
    inv = editor.invert(faces, SEEDS[:2])
    whole = editor.edit(faces, SEEDS[:2], ("old",), inversion=inv).outputs["old"]
    joint = JointRectifier(d, [rects["old"]], faces)
    fn = joint.trajectory(inv, 0, chunk=4)  # windows of 2 steps x 2 images: 3 calls
    held = []
    step = fn.__call__

    def spy(x_t, t):
        eps = step(x_t, t)
        held.append(next(iter(fn.factors.values())).a.shape[0])  # steps whose factors are held
        return eps

    assert joint.passes.hypernetwork == 0  # nothing is computed before the replay reaches it
    out = replay(spy, d.schedule, inv)
    assert joint.passes.hypernetwork == 3 and held == [2, 2, 2, 2, 1]
    assert (out - whole).abs().max() <= 1e-12
    one = JointRectifier(d, [rects["old"]], faces)  # a chunk below B: one step per call
    assert (replay(one.trajectory(inv, 0, chunk=1), d.schedule, inv) - whole).abs().max() <= 1e-12
    assert one.passes.hypernetwork == 5
    with pytest.raises(ValueError, match="source images"):
        JointRectifier(d, [rects["old"]], faces[:1]).trajectory(inv, 0)


def test_evaluate_reports_both_conditionings_and_both_modes_side_by_side(random_denoiser, rects,
                                                                          faces):
    """stages/evaluate: per attribute and N, each conditioning's scores, the default's being
    the editing table's, and the mean/max |trajectory - live| of exactly those edits; the same
    for the two edit modes (edit-friendly replay, DDIM inversion + sampling)."""
    import warnings

    from hfedit.models.clip import load_clip
    from hfedit.config import load_config
    from hfedit.evaluation.comparisons import evaluate_edits

    cfg = load_config(overrides=["evaluate.steps=[3,4]", "clip.model=ViT-S-32"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(cfg.clip)
    x0 = faces[:2]
    results, edited, compared, modes = evaluate_edits(cfg, random_denoiser,
                                                      {"smiling": rects["smiling"]}, clip, x0)
    assert [r["steps"] for r in compared["smiling"]] == [3, 4]
    for r, summary, (n, default_edit) in zip(compared["smiling"], results["smiling"], edited["smiling"]):
        assert r["default"] == "trajectory" and r["trajectory"]["l1"] == summary["l1"]
        editor = _editor(random_denoiser, rects, steps=n)
        seeds = [cfg.inversion.seed + i for i in range(2)]
        live = editor.edit(x0, seeds, ("smiling",), condition="live").outputs["smiling"].clamp(-1, 1)
        diff = (default_edit - live).abs()
        assert r["difference"] == {"mean": float(diff.mean()), "max": float(diff.max())}
        assert r["difference"]["max"] > 0 and r["live"]["l1"] != r["trajectory"]["l1"]
    for r, summary, (n, default_edit) in zip(modes["smiling"], results["smiling"], edited["smiling"]):
        assert r["default"] == summary["mode"] == "edit_friendly"
        assert r["edit_friendly"]["l1"] == summary["l1"] and r["edit_friendly"]["images"] == 2
        ddim = Editor(random_denoiser, InversionConfig(num_steps=n, mode="ddim"), rects).edit(
            x0, [0, 1], ("smiling",)).outputs["smiling"].clamp(-1, 1)
        diff = (default_edit - ddim).abs()
        assert r["difference"]["mean"] == pytest.approx(float(diff.mean()), rel=1e-6)
        assert r["difference"]["max"] > 1e-3
