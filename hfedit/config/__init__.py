"""Typed configuration: one dataclass per pipeline stage, loaded with OmegaConf.

Values come, in increasing priority, from
  1. the dataclass defaults below,
  2. the profile preset ``conf/profiles/<profile>.yaml`` (the keys that define a profile:
     backbone, resolution, CLIP model and weights, budgets),
  3. ``params.yaml`` (one section per stage; what users tune and DVC tracks). It leaves out the
     keys the profiles set, so a key written there (``dvc exp run -S backbone.source=/models/x``
     adds it) wins over the profile's value,
  4. ``conf/runtime.yaml`` (where MLflow and Ray live on this machine),
  5. command-line overrides in dot-list form (``backbone.train.steps=100``).

Every source is validated against the schema: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key and the file it came from; values out of range (a step count
of 0, ...) raise it naming the key, the rule and the flag or file that sets it.

Imports omegaconf and, of hfedit, only the top-level :mod:`hfedit.device` and
:mod:`hfedit.validation`: no other subpackage, and no torch at import (prepare's decode
processes read the config).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hfedit.config.schema import (
    ConfigError,
    DataConfig,
    UNetConfig,
    BetaSchedule,
    SchedulerConfig,
    BackboneTrainConfig,
    BackboneConfig,
    Conditioning,
    EditMode,
    InversionConfig,
    RectifierTrunk,
    ModulationMode,
    RectifierConfig,
    ReconLossKind,
    Augmentation,
    PretrainConfig,
    ClipConfig,
    EditMethod,
    LargeT,
    AttributeConfig,
    MarkovianConfig,
    EditAblationConfig,
    EditsConfig,
    EditBatchConfig,
    MlflowConfig,
    RayConfig,
    RuntimeConfig,
    EvaluateConfig,
    HfeditConfig,
)
from hfedit.validation import check_config


def project_root() -> Path:
    """The folder holding params.yaml: $HFEDIT_ROOT, else the nearest parent of the cwd holding
    one, else the checkout this package is installed from (an editable install: the CLI works
    from any folder), else the cwd."""
    env = os.environ.get("HFEDIT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "params.yaml").is_file() and (checkout / "conf").is_dir():
        return checkout
    return here


def _merge(base: DictConfig, extra: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err.msg).splitlines()[0]
        raise ConfigError(f"{origin}: invalid config key '{key}': {reason}") from None


def _read_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors carry the line number
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    return loaded if loaded is not None else OmegaConf.create({})


def load_config(
    params: str | Path | None = None,
    overrides: list[str] | None = None,
    conf_dir: str | Path | None = None,
    profile: Optional[str] = None,
) -> HfeditConfig:
    """Load the typed config: defaults <- profile preset <- params.yaml <- runtime <- overrides.

    ``params=None`` reads ``<project_root>/params.yaml`` when it exists. ``profile`` (or
    ``profile=`` in params.yaml / overrides) picks ``conf/profiles/<profile>.yaml``.
    Raises :class:`ConfigError` naming the offending key.
    """
    root = project_root()
    params_path = Path(params) if params is not None else root / "params.yaml"
    conf_path = Path(conf_dir) if conf_dir is not None else root / "conf"
    overrides = list(overrides or [])

    cfg = OmegaConf.structured(HfeditConfig)
    user = OmegaConf.create({})
    if params_path.is_file():
        user = _read_yaml(params_path)
        _merge(cfg, user, str(params_path))  # validated against the schema, file named
    elif params is not None:
        raise ConfigError(f"params file not found: {params_path}")

    try:
        cli = OmegaConf.from_dotlist(overrides)
    except Exception as err:
        raise ConfigError(f"command-line overrides {overrides}: {err}") from None
    chosen = profile or cli.get("profile") or user.get("profile") or cfg.profile
    preset = conf_path / "profiles" / f"{chosen}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in (conf_path / "profiles").glob("*.yaml"))
        raise ConfigError(f"profile '{chosen}': no preset {preset} (known: {known})")
    cfg = _merge(cfg, _read_yaml(preset), str(preset))
    cfg = _merge(cfg, user, str(params_path))
    runtime = conf_path / "runtime.yaml"
    if runtime.is_file():
        cfg = _merge(cfg, OmegaConf.create({"runtime": _read_yaml(runtime)}), str(runtime))
    cfg = _merge(cfg, cli, "command line")
    cfg.profile = chosen
    typed: HfeditConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    for attribute in typed.edits.attributes.values():  # steps 0: the profile's budget
        attribute.steps = attribute.steps or typed.edits.steps
    check_config(typed, ConfigError)  # values the types cannot check (hfedit/validation.py)
    return typed


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """Flatten a config (dataclass or DictConfig) to ``{"a.b.c": value}`` for tracking."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", container)
    return flat


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = [
    "ConfigError",
    "DataConfig",
    "UNetConfig",
    "BetaSchedule",
    "SchedulerConfig",
    "BackboneTrainConfig",
    "BackboneConfig",
    "Conditioning",
    "EditMode",
    "InversionConfig",
    "RectifierTrunk",
    "ModulationMode",
    "RectifierConfig",
    "ReconLossKind",
    "Augmentation",
    "PretrainConfig",
    "ClipConfig",
    "EditMethod",
    "LargeT",
    "AttributeConfig",
    "MarkovianConfig",
    "EditAblationConfig",
    "EditsConfig",
    "EditBatchConfig",
    "MlflowConfig",
    "RayConfig",
    "RuntimeConfig",
    "EvaluateConfig",
    "HfeditConfig",
    "load_config",
    "project_root",
    "to_flat_dict",
    "to_yaml",
]
