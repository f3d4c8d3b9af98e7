"""Rectifiers as servable MLflow models (the pyfunc flavour), registered with aliases and tags.

Every rectifier a stage trains is logged as an MLflow *pyfunc model* (``pipelines/serving_model.py``
is the model, as code: nothing is pickled) holding its own copy of what it needs:

- artifacts ``rectifier`` (safetensors + JSON), ``base`` (the reconstruction rectifier whose
  trunk an edit rectifier shares, ``edits.share_trunk``) and ``backbone`` (the diffusers folder;
  a hub id is kept as ``backbone_source`` in the model config instead of a copy);
- the ``hfedit`` package as model code, so ``mlflow models serve --env-manager local`` needs only
  torch, diffusers and Pillow in the serving environment;
- a signature: input ``image`` (base64 of an image file) and optional ``seed``; output ``image``
  (base64 PNG), ``width``, ``height``, ``error``; params ``num_steps``, ``skip``, ``eta``.

Registered as ``<prefix>-edit-<attribute>`` (edit rectifiers) and ``<prefix>-rectifier`` (the
reconstruction rectifier). The version just trained by the pipeline gets the alias
``champion`` (``models:/hfedit-edit-smiling@champion`` is always the pipeline's latest), and
tags on the version and on the registered model say what it is: ``hfedit.attribute``,
``hfedit.semantic`` (``false`` when CLIP had random weights: the offline default), the edit
method, the fingerprint and the backbone.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hfedit.config import HfeditConfig, InversionConfig, to_flat_dict

log = logging.getLogger("hfedit.serving")
MODEL_FILE = Path(__file__).with_name("serving_model.py")
CHAMPION = "champion"
# The distributions the model's code imports; pinned to this environment's versions.
REQUIREMENTS = ("torch", "diffusers", "safetensors", "pillow", "numpy", "pandas", "omegaconf",
                "tqdm", "mlflow")


def signature(inversion: InversionConfig):
    """The request/response schema of a rectifier model (params default to ``inversion``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("long", "width"),
                        ColSpec("long", "height"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("num_steps", "long", inversion.num_steps),
                            ParamSpec("skip", "long", inversion.skip),
                            ParamSpec("eta", "double", float(inversion.eta))]))


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_rectifier_model(cfg: HfeditConfig, run_id: str, backbone: str | Path, rectifier_dir: str | Path,
                        name: str, attribute: str, tags: dict[str, Any] | None = None) -> str | None:
    """Log ``rectifier_dir`` (with the backbone it modulates) as a pyfunc model of the run
    ``run_id`` under ``models/<name>``, register it as ``<prefix>-<name>``, point the alias
    ``champion`` at the new version and tag it. Returns the version (None when
    ``runtime.mlflow.register`` is off: the model is still logged to the run)."""
    import hfedit
    import mlflow

    mc = cfg.runtime.mlflow
    model_name = f"{mc.registry_prefix}-{name}"
    backbone_path = Path(str(backbone))
    artifacts = {"rectifier": str(Path(rectifier_dir).resolve())}
    meta = json.loads((Path(rectifier_dir) / "rectifier.json").read_text())
    if "base" in meta:  # an edit rectifier sharing the reconstruction rectifier's trunk
        artifacts["base"] = str((Path(rectifier_dir) / meta["base"]["path"]).resolve())
    model_config: dict[str, Any] = {
        "attribute": attribute, "max_pixels": cfg.data.max_pixels,
        "inversion": {k: (v.value if hasattr(v, "value") else v)
                      for k, v in to_flat_dict(cfg.inversion).items()}}
    if backbone_path.is_dir():
        artifacts["backbone"] = str(backbone_path.resolve())
    else:  # a hub id: the serving machine downloads it (HF_HUB_OFFLINE=0) or has it cached
        model_config["backbone_source"] = str(backbone)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    active = mlflow.active_run()
    started = active is None or active.info.run_id != run_id
    if started:
        mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_FILE), artifacts=artifacts,
            model_config=model_config, code_paths=[str(Path(hfedit.__file__).parent)],
            signature=signature(cfg.inversion), pip_requirements=requirements(),
            registered_model_name=model_name if mc.register else None, tags=all_tags)
    finally:
        if started:
            mlflow.end_run()
    if not mc.register:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in all_tags.items():
        client.set_model_version_tag(model_name, version, key, value)
        client.set_registered_model_tag(model_name, key, value)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.update_registered_model(
        model_name, description=(
            f"hfedit rectifier ({attribute}) as a pyfunc model: base64 image in, base64 PNG "
            f"out. Serve: mlflow models serve -m models:/{model_name}@{CHAMPION} "
            "--env-manager local"))
    log.info("registered %s version %s (@%s)", model_name, version, CHAMPION)
    return version


def fetch_model(uri: str, dest: str | Path) -> tuple[Path, str]:
    """A registered rectifier model (``models:/hfedit-edit-smiling@champion``, ``.../3``) as the
    pipeline's folders under ``dest``: ``dest/backbone``, ``dest/edits/<attribute>`` (or
    ``dest/rectifier`` for the reconstruction rectifier) and, for a shared-trunk edit, its base
    where the edit's relative reference points (``dest/rectifier`` in the pipeline's layout). Returns (backbone folder or
    hub id, attribute). Needs the tracking URI that holds the model (``MLFLOW_TRACKING_URI``)."""
    import shutil

    import mlflow
    from mlflow.models import Model

    dest = Path(dest)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest / ".download")))
    flavor = Model.load(str(local)).flavors["python_function"]
    conf, paths = flavor.get("config", {}), {k: v["path"] for k, v in flavor["artifacts"].items()}
    attribute = conf.get("attribute", "")
    places = {"rectifier": dest / ("rectifier" if attribute == "rectifier" else f"edits/{attribute}"),
              "backbone": dest / "backbone"}
    if "base" in paths:  # where the edit's JSON looks for it (../../rectifier in the pipeline)
        meta = json.loads((local / paths["rectifier"] / "rectifier.json").read_text())
        places["base"] = Path(os.path.normpath(places["rectifier"] / meta["base"]["path"]))
        if not places["base"].is_relative_to(dest):
            raise ValueError(f"{uri}: the edit's base {meta['base']['path']} leaves {dest}")
    for key, rel in paths.items():
        if places[key].exists():
            shutil.rmtree(places[key])
        places[key].parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local / rel, places[key])
    shutil.rmtree(dest / ".download", ignore_errors=True)
    backbone = places["backbone"] if "backbone" in paths else conf["backbone_source"]
    return backbone, attribute
