"""Rectifiers and the backbone as servable MLflow models (the pyfunc flavour), registered with
aliases and tags.

Every rectifier a stage trains is logged as an MLflow *pyfunc model* (``pipelines/serving_model.py``
is the model, as code: nothing is pickled) with:

- artifacts ``rectifier`` (safetensors + JSON) and ``base`` (the reconstruction rectifier whose
  trunk an edit rectifier shares, ``edits.share_trunk``);
- the backbone *linked*: the backbone stage registers its model as ``<prefix>-backbone`` (a
  pyfunc that reconstructs: invert + exact replay), and a rectifier model trained on those
  weights (same sha256) records ``backbone_model: models:/<prefix>-backbone/<version>`` in its
  config and tags, and fetches it from the registry when loaded; without a registered
  backbone (``runtime.mlflow.register: false``, another store) the diffusers folder is copied
  in as the artifact ``backbone``, and a hub id is kept as ``backbone_source``;
- the ``hfedit`` package as model code, so ``mlflow models serve --env-manager local`` needs only
  torch, diffusers and Pillow in the serving environment;
- a signature: input ``image`` (base64 of an image file) and optional ``seed``; output ``image``
  (base64 PNG), ``width``, ``height``, ``error``; params ``num_steps``, ``skip``, ``eta``.

Registered as ``<prefix>-edit-<attribute>`` (edit rectifiers), ``<prefix>-rectifier`` (the
reconstruction rectifier) and ``<prefix>-backbone``. ``models:/<name>/latest`` is the newest version
(under ``dvc exp run`` it also gets the alias ``exp-<name>``); ``champion``, what serving and batch jobs use, moves
only on a promotion: ``runtime.mlflow.promote=true`` for a run, or afterwards
``python -m pipelines.serving promote hfedit-edit-smiling latest`` (a model's first version is its
champion), and tags on the version and on the registered model say what it is:
``hfedit.attribute``, ``hfedit.semantic`` (``false`` when CLIP had random weights: the offline
default), the edit method, the fingerprint and the backbone.
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
CHAMPION = "champion"  # what serving and batch jobs use; moved only by a promotion
LATEST = "latest"  # models:/<name>/latest: the newest version (a name MLflow reserves)
BACKBONE = "backbone"
RECONSTRUCTION = "reconstruction"  # hfedit.editing.editor.RECONSTRUCTION (not imported: no torch here)
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


def registered_backbone(cfg: HfeditConfig, folder: Path) -> str | None:
    """``models:/<prefix>-backbone/<version>``: the newest registered backbone version holding the
    weights of ``folder`` (same digest), else None (registration off, none registered, or
    another backbone: the model then carries its own copy)."""
    import mlflow

    if not cfg.runtime.mlflow.register:
        return None
    from hfedit.models.checkpoint import model_reference

    digest = model_reference(folder).get("sha256")
    name = f"{cfg.runtime.mlflow.registry_prefix}-{BACKBONE}"
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    same = [int(mv.version) for mv in versions if digest and mv.tags.get("hfedit.backbone_sha256") == digest]
    return f"models:/{name}/{max(same)}" if same else None


def log_backbone_model(cfg: HfeditConfig, run_id: str, folder: str | Path) -> str | None:
    """Register the backbone ``folder`` as ``<prefix>-backbone`` (@champion): a pyfunc model that
    reconstructs (inverts and replays exactly, the ``reconstruction`` attribute of edit_batch),
    which every rectifier model trained on it links to instead of carrying a copy."""
    from hfedit.models.checkpoint import model_reference

    digest = model_reference(folder).get("sha256", "")
    return log_rectifier_model(cfg, run_id, folder, None, BACKBONE, RECONSTRUCTION,
                               tags={"hfedit.kind": "backbone", "hfedit.backbone_sha256": digest})


def log_rectifier_model(cfg: HfeditConfig, run_id: str, backbone: str | Path,
                        rectifier_dir: str | Path | None, name: str, attribute: str,
                        tags: dict[str, Any] | None = None) -> str | None:
    """Log ``rectifier_dir`` (with the backbone it modulates) as a pyfunc model of the run
    ``run_id`` under ``models/<name>``, register it as ``<prefix>-<name>``, point the alias
    ``champion`` at the new version and tag it. The backbone is linked (``backbone_model`` in
    the model config: the registered backbone with the same weights, see
    :func:`log_backbone_model`) or, when none is registered, copied into the model.
    ``rectifier_dir=None``: the backbone's own model. Returns the version (None when
    ``runtime.mlflow.register`` is off: the model is still logged to the run)."""
    import hfedit
    import mlflow

    mc = cfg.runtime.mlflow
    model_name = f"{mc.registry_prefix}-{name}"
    backbone_path = Path(str(backbone))
    artifacts = {}
    if rectifier_dir is not None:
        artifacts["rectifier"] = str(Path(rectifier_dir).resolve())
        meta = json.loads((Path(rectifier_dir) / "rectifier.json").read_text())
        if "base" in meta:  # an edit rectifier sharing the reconstruction rectifier's trunk
            artifacts["base"] = str((Path(rectifier_dir) / meta["base"]["path"]).resolve())
    model_config: dict[str, Any] = {
        "attribute": attribute, "max_pixels": cfg.data.max_pixels,
        "inversion": {k: (v.value if hasattr(v, "value") else v)
                      for k, v in to_flat_dict(cfg.inversion).items()}}
    linked = (registered_backbone(cfg, backbone_path)
              if backbone_path.is_dir() and rectifier_dir is not None else None)
    if linked:  # the registered backbone model holding these very weights: linked, not copied
        model_config["backbone_model"] = linked
        tags = {**(tags or {}), "hfedit.backbone_model": linked}
    elif backbone_path.is_dir():
        artifacts["backbone"] = str(backbone_path.resolve())
    else:  # a hub id: the serving machine downloads it (HF_HUB_OFFLINE=0) or has it cached
        model_config["backbone_source"] = str(backbone)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    # the model's source is its run's (the stage script), not the process that logs it (a Ray
    # task's default_worker.py): MLflow takes the given tags over the ones it infers
    run_tags = mlflow.MlflowClient().get_run(run_id).data.tags
    source = {k: v for k, v in run_tags.items() if k.startswith("mlflow.source.")}
    active = mlflow.active_run()
    started = active is None or active.info.run_id != run_id
    if started:
        mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_FILE), artifacts=artifacts,
            model_config=model_config, code_paths=[str(Path(hfedit.__file__).parent)],
            signature=signature(cfg.inversion), pip_requirements=requirements(),
            registered_model_name=model_name if mc.register else None,
            tags={**all_tags, **source})
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
    aliases = new_version_aliases(client, model_name, mc.promote)
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    client.update_registered_model(
        model_name, description=(
            f"hfedit {'rectifier' if rectifier_dir else 'backbone'} ({attribute}) as a pyfunc "
            "model: base64 image in, base64 PNG "
            f"out. Serve: mlflow models serve -m models:/{model_name}@{CHAMPION} "
            "--env-manager local"))
    log.info("registered %s version %s (aliases: %s)", model_name, version,
             ", ".join(aliases) or "none; models:/%s/latest" % model_name)
    return version


def new_version_aliases(client, model_name: str, promote: bool) -> list[str]:
    """The aliases a newly registered version gets (``models:/<name>/latest`` names the newest
    version without one): ``exp-<name>`` under
    ``dvc exp run`` (a trial); ``champion`` only when promoted (``runtime.mlflow.promote``, or
    :func:`promote` later) or when the model has no champion yet and this is not a trial."""
    import re

    import mlflow

    aliases = []  # models:/<name>/latest is the newest version already (MLflow reserves it)
    trial = os.environ.get("DVC_EXP_NAME")
    if trial:
        aliases.append("exp-" + re.sub(r"[^A-Za-z0-9_-]", "-", trial))
    try:
        client.get_model_version_by_alias(model_name, CHAMPION)
        has_champion = True
    except mlflow.exceptions.MlflowException:
        has_champion = False
    if promote or (not has_champion and not trial):
        aliases.append(CHAMPION)
    return aliases


def promote(model_name: str, version_or_alias: str, tracking_uri: str | None = None) -> str:
    """Point ``champion`` of ``model_name`` at a version (a number or another alias, e.g.
    ``latest`` or ``exp-<name>``); returns the version."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if version_or_alias.isdigit():
        version = version_or_alias
    elif version_or_alias == LATEST:
        version = str(max(int(mv.version) for mv in
                          client.search_model_versions(f"name = '{model_name}'")))
    else:
        version = client.get_model_version_by_alias(model_name, version_or_alias).version
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    return str(version)


def backbone_folder(uri: str, dest: str | Path) -> Path:
    """The diffusers folder of the registered backbone model ``uri``
    (``models:/<prefix>-backbone/<version>``), downloaded under ``dest``."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    flavor = Model.load(str(local)).flavors["python_function"]
    return local / flavor["artifacts"]["backbone"]["path"]


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
    if "backbone" not in paths and conf.get("backbone_model"):  # linked: fetch it too
        if places["backbone"].exists():
            shutil.rmtree(places["backbone"])
        shutil.copytree(backbone_folder(conf["backbone_model"], dest / ".download" / BACKBONE),
                        places["backbone"])
        paths["backbone"] = BACKBONE
    shutil.rmtree(dest / ".download", ignore_errors=True)
    backbone = places["backbone"] if "backbone" in paths else conf["backbone_source"]
    return backbone, attribute



def load_pipeline(uri: str, dest: str | Path | None = None, **kwargs):
    """A registered model (``models:/hfedit-edit-smiling@champion``, ``.../3``) as the front
    door, :class:`hfedit.pipeline.HFEditPipeline`: fetched with :func:`fetch_model` into
    ``dest`` (a new temporary folder by default), then ``from_pretrained`` with ``kwargs``."""
    import tempfile

    from hfedit.pipeline import HFEditPipeline

    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="hfedit-model-"))
    backbone, _ = fetch_model(uri, dest)
    if not Path(backbone).is_dir():
        raise ValueError(f"{uri}: its backbone is the hub id {backbone}; load it with "
                         f"HFEditPipeline.from_pretrained({str(dest)!r}) after downloading the "
                         f"backbone into {dest / 'backbone'}")
    return HFEditPipeline.from_pretrained(dest, **kwargs)

def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.serving promote <model> <version|alias>``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="point a registered model's champion alias at a version")
    p.add_argument("model", help="registered model name, e.g. hfedit-edit-smiling")
    p.add_argument("version", help="a version number or an alias (latest, exp-<name>)")
    args = parser.parse_args(argv)
    from hfedit.config import load_config
    from pipelines.tracking import tracking_uri

    try:
        version = promote(args.model, args.version, tracking_uri(load_config()))
    except Exception as err:  # an unknown model, version or alias: one line, exit 2
        print(f"promote: {err}", file=__import__("sys").stderr)
        return 2
    print(f"{args.model}@{CHAMPION} -> version {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
