"""Typed config: defaults, params.yaml, profile presets, overrides; typos fail by key name."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfedit.config import ConfigError, load_config, to_flat_dict

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_with_tiny_profile():
    cfg = load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf")
    assert cfg.profile == "tiny" and cfg.backbone.source == "train"
    assert cfg.data.resolution == 32


def test_profile_preset_and_overrides_take_priority():
    cfg = load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf",
                      overrides=["profile=celebahq256", "inversion.num_steps=100"])
    assert cfg.backbone.source == "google/ddpm-ema-celebahq-256"
    assert cfg.data.resolution == 256 and cfg.inversion.num_steps == 100
    assert cfg.clip.model == "ViT-B-32" and cfg.clip.weights == "openai"


def test_a_key_written_in_params_wins_over_the_profile(tmp_path):
    """What `dvc exp run -S profile=celebahq256 -S backbone.source=/models/x` writes: the
    profile sets everything else, the user's local copy of the model is used."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(ROOT / "params.yaml")
    OmegaConf.update(params, "profile", "celebahq256")
    OmegaConf.update(params, "backbone.source", "/models/ddpm-ema-celebahq-256", force_add=True)
    OmegaConf.update(params, "clip.weights", "/models/vit-b-32.safetensors", force_add=True)
    OmegaConf.save(params, tmp_path / "params.yaml")
    cfg = load_config(tmp_path / "params.yaml", conf_dir=ROOT / "conf")
    assert cfg.backbone.source == "/models/ddpm-ema-celebahq-256"
    assert cfg.clip.weights == "/models/vit-b-32.safetensors"
    assert cfg.data.resolution == 256 and cfg.clip.model == "ViT-B-32"  # from the profile
    tiny = load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf")
    assert (tiny.clip.model, tiny.clip.weights, tiny.data.resolution) == ("ViT-S-32", "", 32)


@pytest.mark.parametrize("override, key", [
    (["backbone.trian.steps=3"], "backbone.trian"),
    (["data.resolutoin=64"], "data.resolutoin"),
    (["backbone.train.steps=many"], "backbone.train.steps"),
    (["backbone.scheduler.beta_schedule=cubic"], "backbone.scheduler.beta_schedule"),
])
def test_typo_or_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf", overrides=override)
    assert f"'{key}'" in str(err.value) and "command line" in str(err.value)


def test_typo_in_params_file_names_file_and_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  resolution: 32\n  val_fracton: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, conf_dir=ROOT / "conf")
    assert "data.val_fracton" in str(err.value) and str(bad) in str(err.value)


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match=r"profile 'huge'.*celebahq256"):
        load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf", profile="huge")


def test_flat_dict_has_dotted_keys():
    flat = to_flat_dict(load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf"))
    assert flat["backbone.train.lr"] == pytest.approx(1e-3)
    assert flat["backbone.scheduler.beta_schedule"] == "linear"


def test_values_out_of_range_fail_naming_the_key_the_rule_and_the_flag():
    """Types alone let a step count of 0 or a negative batch through to the work."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["inversion.num_steps=10", "inversion.skip=10",
                               "edit_batch.num_cpus=0", "data.val_fraction=1.0",
                               "evaluate.sdedit_strengths=[0.5,1.5]",
                               "evaluate.side_by_side=[modes,condition]"])
    text = str(err.value)
    assert "evaluate.side_by_side=['modes', 'condition']: ['condition'] unknown" in text
    assert "evaluate.sdedit_strengths=[0.5, 1.5]: each must be in (0, 1]" in text
    assert "inversion.skip=10 must be less than inversion.num_steps=10" in text
    assert "edit_batch.num_cpus=0.0 must be positive" in text and "--num-cpus" in text
    assert "data.val_fraction=1.0 must be in [0, 1)" in text
    assert load_config(overrides=["inversion.num_steps=1", "inversion.skip=0"]).inversion.num_steps == 1


def test_the_paper_profile_carries_the_papers_setting():
    """celebahq256: man and pixar beside smiling/old with their texts and the paper's lambdas
    and lr schedule, the paper's pretraining lr decay, N = 50, ~100 evaluated images; the
    budgets come from the profile (params.yaml does not override them)."""
    paper = load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf", profile="celebahq256")
    attrs = paper.edits.attributes
    assert set(attrs) == {"smiling", "old", "man", "pixar"}
    assert (attrs["man"].source, attrs["man"].target) == ("a person", "a man")
    assert attrs["pixar"].target == "3D render in the style of Pixar"
    for a in attrs.values():
        assert (a.lambda_clip, a.lambda_recon, a.lr, a.decay) == (1.0, 1.0, 1e-3, 0.9)
        assert a.num_images == 100
    assert attrs["pixar"].decay_every > attrs["man"].decay_every == 10  # slower for drastic edits
    assert (paper.pretrain.lr, paper.pretrain.weight_decay, paper.pretrain.lr_decay_every,
            paper.pretrain.lr_decay) == (1e-3, 1e-5, 5000, 0.9)
    assert paper.inversion.num_steps == 50 and paper.evaluate.images == 100
    assert paper.pretrain.steps > 5000 and list(paper.evaluate.steps) == [50]
    tiny = load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf")
    assert set(tiny.edits.attributes) == {"smiling", "old"}
    assert (tiny.pretrain.steps, tiny.evaluate.images, list(tiny.evaluate.steps)) == (
        500, 8, [10, 50, 100])
    assert tiny.edits.attributes["smiling"].steps == 40
    # disjoint roles where hfedit trains the backbone; none where it comes trained
    assert (tiny.data.rectifier_fraction, paper.data.rectifier_fraction) == (0.3, 0.0)
    assert not tiny.pretrain.augment.off


@pytest.mark.parametrize("override, says", [
    (["edits.attributes.smiling.large_t=range", "edits.attributes.smiling.t_max=0"],
     "edits.attributes.smiling.t_max=0 must be in [1, 1000]"),
    (["edits.markovian.t0=1000"], "edits.markovian.t0=1000 must be in [0, 1000)"),
    (["edits.attributes.smiling.large_t=clip"], "edits.attributes.smiling.large_t"),
])
def test_bad_large_t_settings_name_the_key_and_the_fix(override, says):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", conf_dir=ROOT / "conf", overrides=override)
    assert says in str(err.value)
