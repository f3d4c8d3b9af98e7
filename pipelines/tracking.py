"""MLflow at the edge: one run per stage, params flattened, metrics always with ``step=``.

The store defaults to a local SQLite file (``<project>/mlflow.db``, artifacts in
``<project>/mlartifacts``); ``MLFLOW_TRACKING_URI`` or ``runtime.mlflow.tracking_uri`` point
elsewhere (a remote ``mlflow server``). ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
browses the local one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hfedit.config import HfeditConfig, project_root, to_flat_dict

# A run started by an outer process (the pipeline's parent run) is passed down in this variable.
PARENT_ENV = "HFEDIT_PARENT_RUN_ID"
log = logging.getLogger("hfedit.tracking")


def tracking_uri(cfg: HfeditConfig) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.runtime.mlflow.tracking_uri:
        return cfg.runtime.mlflow.tracking_uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _experiment_id(mlflow, cfg: HfeditConfig) -> str:
    name = cfg.runtime.mlflow.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    artifacts = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the local store, not in the cwd
        artifacts = (project_root() / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created concurrently by another stage process
        return mlflow.get_experiment_by_name(name).experiment_id


class StageRun:
    """What a stage logs through; a thin facade so stages never call MLflow directly."""

    def __init__(self, mlflow, run) -> None:
        self._mlflow = mlflow
        self.run = run
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        for start in range(0, len(params), 100):  # MLflow's batch limit
            chunk = dict(list(params.items())[start:start + 100])
            self._mlflow.log_params({k: str(v)[:500] for k, v in chunk.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)


@contextlib.contextmanager
def stage_run(cfg: HfeditConfig, stage: str, tags: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """Start the MLflow run of ``stage`` (nested under $HFEDIT_PARENT_RUN_ID when set), log the
    flattened config as params, yield a :class:`StageRun`, and end the run (FAILED on error)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp_id = _experiment_id(mlflow, cfg)
    parent = os.environ.get(PARENT_ENV)
    run_tags = {"hfedit.stage": stage, "hfedit.profile": cfg.profile, **(tags or {})}
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=run_tags) as run:
        tracker = StageRun(mlflow, run)
        tracker.log_params(to_flat_dict(cfg))
        with tempfile.TemporaryDirectory() as tmp:
            from hfedit.config import to_yaml

            cfg_file = Path(tmp) / "config.yaml"
            cfg_file.write_text(to_yaml(cfg))
            tracker.log_artifact(cfg_file)
        log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, mlflow.get_tracking_uri())
        yield tracker


def experiment_id(cfg: HfeditConfig) -> str:
    """The id of the configured experiment in the configured store (created when missing)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    return _experiment_id(mlflow, cfg)


@contextlib.contextmanager
def child_run(uri: str, experiment_id: str, parent_run_id: str, name: str,
              tags: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """A run nested under ``parent_run_id`` (tag ``mlflow.parentRunId``), started in whatever
    process does the work (a Ray task: one per attribute under the stage's run). Ends FAILED
    when the block raises."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    run_tags = {"mlflow.parentRunId": parent_run_id, **{k: str(v) for k, v in (tags or {}).items()}}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=run_tags) as run:
        yield StageRun(mlflow, run)
