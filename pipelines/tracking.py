"""MLflow at the edge: one run per stage, params flattened, metrics always with ``step=``.

Runs nest: a *pipeline* run per ``dvc repro`` / ``dvc exp run`` invocation, a run per stage
under it, and runs per attribute (or method) under their stage. DVC starts every stage as its own
process and passes no run id, so a stage finds its pipeline run by a key of the ``dvc`` process
it runs under (host, pid, start time): the first stage of an invocation creates the run, the
later ones nest under it. ``$HFEDIT_PARENT_RUN_ID`` names the parent explicitly instead (a
wrapper script, ``ray job submit``); a stage run by hand has none.

The reconstruction rectifier and every edit rectifier are logged as servable pyfunc models and
registered (``runtime.mlflow.register``) as ``<prefix>-rectifier`` and
``<prefix>-edit-<attribute>``, the latest version aliased ``champion``: see
:mod:`pipelines.serving`.

The store defaults to a local SQLite file (``<project>/mlflow.db``, artifacts in
``<project>/mlartifacts``); ``MLFLOW_TRACKING_URI`` or ``runtime.mlflow.tracking_uri`` point
elsewhere: another SQLite file (artifacts in ``mlartifacts/`` beside it) or a remote
``mlflow server`` (artifacts where the server puts them). ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
browses the local one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hfedit.config import HfeditConfig, project_root, to_flat_dict

# A run started by an outer process (the pipeline's parent run) is passed down in this variable.
PARENT_ENV = "HFEDIT_PARENT_RUN_ID"
# The config a stage's run logs as params: its own sections (the params.yaml sections its DVC
# stage depends on) plus the profile and the device settings; the whole merged config is the
# run's config.yaml artifact. A stage not listed logs everything.
STAGE_SECTIONS = {
    "prepare": ("data",),
    "backbone": ("backbone", "data.resolution"),
    "pretrain_rectifier": ("pretrain", "rectifier"),
    "train_edits": ("edits.attributes", "edits.markovian", "edits.share_trunk", "edits.log_every",
                    "clip"),
    "edit_ablation": ("edits.ablation", "edits.markovian", "edits.share_trunk", "clip",
                      "inversion"),
    "edit_batch": ("edit_batch", "inversion"),
    "evaluate": ("evaluate", "inversion"),
}
ALWAYS = ("profile", "runtime.device", "runtime.precision")


# Numbers that differ on every run (wall times, timestamps): in MLflow and the stages' reports,
# never in the DVC metrics files, so that the tracked files of a rerun with the same code and
# data stay unchanged and `dvc metrics diff` shows results only.
TIMING = frozenset({"seconds", "seconds_per_step", "setup_seconds", "train_seconds",
                    "started_at", "finished_at"})


def finite(v: Any) -> bool:
    """A number MLflow and DVC can show (not a bool, None, NaN or inf)."""
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metrics_file(report: dict) -> dict:
    """What a stage's DVC metrics file holds of its nested ``report``: the finite numbers,
    without :data:`TIMING` (statuses, notes, fingerprints and times stay in the stage's report,
    status file and MLflow)."""
    out = {}
    for k, v in report.items():
        if k in TIMING:
            continue
        if isinstance(v, dict):
            if sub := metrics_file(v):
                out[k] = sub
        elif finite(v):
            out[k] = v
    return out


# The numbers each stage's DVC metrics file keeps: ``dvc exp show`` makes a column of every one
# (37 for the default profile's two attributes; every number was 149). fnmatch patterns over the
# file's slash names (``*`` crosses slashes). The stage's report keeps everything
# (:func:`write_metrics`; evaluate's eval/report.json, edit_ablation's report.json beside its
# grid), and MLflow gets every number. pipelines/studies.py reads its columns from these.
HEADLINE: dict[str, tuple[str, ...]] = {
    "pretrain_rectifier": ("backbone/l1", "rectifier/l1", "backbone/gap", "rectifier/gap",
                           "rectifier/edit_friendly_max_error", "training/noise_mse"),
    "train_edits": ("attributes/*/final_direction", "attributes/*/final_l1", "trained", "failed"),
    "edit_ablation": ("score_matching/own/clip_direction", "score_matching/own/l1",
                      "markovian/own/clip_direction", "markovian/own/l1"),
    "edit_batch": ("edited", "failed", "attributes/reconstruction/max_error"),
    "evaluate": ("images", "steps", "reconstruction/*_ddim/l1", "reconstruction/*/gap",
                 "reconstruction/*/posterior_mean_gap", "editing/*/clip_direction",
                 "editing/*/l1", "editing/*/ssim", "sdedit/*/l1"),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves under slash names (``{"a": {"b": 1}}`` -> ``{"a/b": 1}``): the
    inverse of :func:`nest_metrics`."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def headline(numbers: dict[str, Any], stage: str) -> dict[str, Any]:
    """The :data:`HEADLINE` numbers of a stage's nested ``numbers``, nested the same way."""
    from fnmatch import fnmatchcase

    keep = {name: v for name, v in flatten(numbers).items()
            if any(fnmatchcase(name, pattern) for pattern in HEADLINE[stage])}
    return nest_metrics(keep, stage)


def report_path(metrics: Path) -> Path:
    """Where a stage whose report has no other home keeps it: beside its metrics file."""
    return metrics.with_name(f"{metrics.stem}.report.json")


def write_metrics(metrics: Path, report: dict[str, Any], stage: str) -> list[Path]:
    """The stage's DVC metrics file (its :func:`headline` numbers) and its whole ``report``
    without :data:`TIMING` (:func:`report_path`); returns both paths (for MLflow)."""
    from hfedit.files import atomic_write_json

    def untimed(tree: dict) -> dict:
        return {k: untimed(v) if isinstance(v, dict) else v for k, v in tree.items()
                if k not in TIMING}

    atomic_write_json(metrics, headline(metrics_file(report), stage))
    atomic_write_json(report_path(metrics), untimed(report))
    return [metrics, report_path(metrics)]


def nest_metrics(flat: dict[str, float], stage: str) -> dict[str, Any]:
    """Metric names of one stage (``<stage>/<group>/<metric>``, the scheme MLflow gets) as the
    nested dict of its DVC metrics file: ``{"evaluate/a/b": 1}`` -> ``{"a": {"b": 1}}``, which
    ``dvc metrics show`` prints as ``a.b``; so both tools show one name per number."""
    out: dict[str, Any] = {}
    for name, v in flat.items():
        *parents, leaf = name.removeprefix(f"{stage}/").split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def stage_params(cfg: HfeditConfig, stage: str) -> dict[str, Any]:
    """The flattened config keys of ``stage``'s sections (:data:`STAGE_SECTIONS`) and
    :data:`ALWAYS`."""
    flat = to_flat_dict(cfg)
    sections = STAGE_SECTIONS.get(stage)
    if sections is None:
        return flat
    keep = (*ALWAYS, *sections)
    return {k: v for k, v in flat.items() if any(k == s or k.startswith(s + ".") for s in keep)}


def pipeline_run_name() -> str:
    """The DVC experiment's name under ``dvc exp run`` (``$DVC_EXP_NAME``), else
    ``pipeline-<UTC time>``."""
    import time

    return os.environ.get("DVC_EXP_NAME") or time.strftime("pipeline-%Y%m%d-%H%M%S", time.gmtime())
log = logging.getLogger("hfedit.tracking")


def uploaded_copy(folder: Path) -> bool:
    """Whether ``folder`` is the copy of a working directory that ``ray job submit
    --working-dir`` unpacked on a node (``.../runtime_resources/working_dir_files/_ray_pkg_*``):
    anything written there is lost with the job's temporary files."""
    return any(part.startswith("_ray_pkg_") for part in Path(folder).resolve().parts)


def tracking_uri(cfg: HfeditConfig, beside: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``runtime.mlflow.tracking_uri``, else the project's
    ``mlflow.db``; under ``ray job submit`` (the project is an uploaded copy) ``beside/mlflow.db``
    instead, ``beside`` being where the job writes its results (edit_batch: ``--out``)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.runtime.mlflow.tracking_uri:
        return cfg.runtime.mlflow.tracking_uri
    root = project_root()
    if beside is not None and uploaded_copy(root):
        store = Path(beside).resolve() / "mlflow.db"
        log.warning("the project is an uploaded copy (%s): MLflow store %s (set "
                    "MLFLOW_TRACKING_URI to choose another)", root, store)
        return f"sqlite:///{store}"
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store ``uri`` keeps its artifacts: for a SQLite store the
    folder ``mlartifacts/`` beside the database file (for the default store that is
    ``<project>/mlartifacts``), wherever the store is; None for other stores (a tracking server
    decides, e.g. by its ``--artifacts-destination``)."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
    if not path or path.startswith(":memory:"):  # no file to sit beside
        return (project_root() / "mlartifacts").resolve().as_uri()
    return (Path(path).expanduser().resolve().parent / "mlartifacts").as_uri()


# The MLflow UI opens an experiment of this kind on its training runs (not the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(mlflow, cfg: HfeditConfig) -> str:
    name = cfg.runtime.mlflow.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        artifacts = artifact_location(mlflow.get_tracking_uri())
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently by another stage process
            exp_id = mlflow.get_experiment_by_name(name).experiment_id
        return exp_id
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    _follow_moved_store(mlflow.get_tracking_uri(), exp)
    return exp.experiment_id


def _follow_moved_store(uri: str, exp) -> None:
    """A SQLite store copied or moved with its project still names the old ``mlartifacts/``
    (MLflow records artifact locations as absolute URIs): re-point the experiment and its runs
    at the ``mlartifacts/`` beside this database, so a copy neither writes into the original nor
    loses its artifacts. Only for local SQLite stores whose recorded folder is not this one."""
    import sqlite3
    from urllib.parse import unquote, urlparse

    here = artifact_location(uri)
    old = exp.artifact_location
    if here is None or not old or old == here or not old.startswith("file:"):
        return
    if not uri.startswith("sqlite:///") or unquote(urlparse(old).path) == unquote(urlparse(here).path):
        return
    database = uri.split(":///", 1)[1].split("?", 1)[0]
    with contextlib.closing(sqlite3.connect(database)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                    (here, int(exp.experiment_id)))
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                              ("model_versions", "storage_location"), ("model_versions", "source")):
            con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608
                        f"WHERE substr({column}, 1, ?) = ?",
                        (here, len(old) + 1, len(old) + 1, old + "/"))
    log.warning("MLflow store %s was moved: artifacts of experiment %s now at %s (were %s)",
                database, exp.name, here, old)


class StageRun:
    """What a stage logs through; a thin facade so stages never call MLflow directly."""

    def __init__(self, run, client) -> None:
        self._client = client
        self.run = run
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow's batch limit
            self._client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def parent(self) -> "StageRun | None":
        """The run this one is nested under (the pipeline run of a stage), or None."""
        parent_id = self._client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        return StageRun(self._client.get_run(parent_id), self._client) if parent_id else None


def dvc_invocation() -> tuple[str, str] | None:
    """``(key, command line)`` of the nearest ``dvc`` ancestor process, or None when this process
    does not run under DVC. The key (host, pid, start time) is unique per invocation."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            cmd = proc.cmdline()
            heads = [os.path.basename(a) for a in cmd[:2]]
            if "dvc" in heads or cmd[1:3] == ["-m", "dvc"]:
                return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}", " ".join(cmd)
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def pipeline_run_id(mlflow, exp_id: str, cfg: HfeditConfig) -> str | None:
    """The parent of a stage run: ``$HFEDIT_PARENT_RUN_ID``, else the pipeline run of the
    enclosing ``dvc`` invocation (created by its first stage), else None."""
    explicit = os.environ.get(PARENT_ENV)
    if explicit:
        return explicit
    found = dvc_invocation()
    if found is None:
        return None
    key, command = found
    client = mlflow.MlflowClient()
    runs = client.search_runs([exp_id], filter_string=f"tags.`hfedit.pipeline_key` = '{key}'",
                              max_results=1)
    if runs:
        return runs[0].info.run_id
    name = pipeline_run_name()
    tags = {"hfedit.kind": "pipeline", "hfedit.pipeline_key": key, "hfedit.command": command,
            "hfedit.profile": cfg.profile, "mlflow.source.git.commit": _git_commit(),
            "mlflow.source.name": command, "mlflow.source.type": "PROJECT", "mlflow.runName": name}
    if os.environ.get("DVC_EXP_NAME"):
        tags["hfedit.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    run = client.create_run(exp_id, run_name=name, tags=tags)
    StageRun(run, client).log_params({k: v for k, v in to_flat_dict(cfg).items() if k in ALWAYS})
    log.info("MLflow pipeline run %s for `%s`", run.info.run_id, command)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(cfg: HfeditConfig, stage: str, tags: dict[str, Any] | None = None,
              store_beside: Path | None = None) -> Iterator[StageRun]:
    """Start the MLflow run of ``stage`` nested under the pipeline run (:func:`pipeline_run_id`),
    log the flattened config as params, yield a :class:`StageRun`, and end the run (FAILED on
    error). ``store_beside``: where the default store goes when the project is an uploaded copy
    (:func:`tracking_uri`). The pipeline run is marked FINISHED (or FAILED) with it; a later stage of the same
    invocation logs into it again."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg, store_beside))
    exp_id = _experiment_id(mlflow, cfg)
    parent = pipeline_run_id(mlflow, exp_id, cfg)
    run_tags = {"hfedit.stage": stage, "hfedit.profile": cfg.profile, **(tags or {})}
    commit = _git_commit()
    if commit:  # also when the script is not the git checkout's (an installed copy)
        run_tags.setdefault("mlflow.source.git.commit", commit)
    owned = bool(parent) and not os.environ.get(PARENT_ENV)  # a pipeline run of ours
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    if owned:
        mlflow.MlflowClient().update_run(parent, status="RUNNING")
    status, run_id = "FAILED", None
    try:
        with _killed_on_sigterm(), \
                mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=run_tags) as run:
            run_id = run.info.run_id
            tracker = StageRun(run, mlflow.MlflowClient())
            tracker.log_params(stage_params(cfg, stage))
            with tempfile.TemporaryDirectory() as tmp:
                from hfedit.config import to_yaml

                cfg_file = Path(tmp) / "config.yaml"
                cfg_file.write_text(to_yaml(cfg))
                tracker.log_artifact(cfg_file)
            log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, mlflow.get_tracking_uri())
            yield tracker
            status = "FINISHED"
    except (Terminated, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        client = mlflow.MlflowClient()
        if status == "KILLED" and run_id:  # start_run's exit marked it FAILED
            client.set_terminated(run_id, status)
        if owned:
            client.set_tag(parent, "hfedit.last_stage", stage)
            client.set_terminated(parent, status)


class Terminated(SystemExit):
    """SIGTERM (``kill``, a scheduler, DVC stopping a stage) as an exception, so runs end KILLED
    and ``finally`` blocks run; the process exits 143 as it would have."""


@contextlib.contextmanager
def _killed_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (only when nobody else handles
    SIGTERM and this is the main thread; edit_batch installs its own handler)."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    # the stage's source and git commit, not the Ray worker's entry point (default_worker.py)
    parent = mlflow.MlflowClient().get_run(parent_run_id).data.tags
    source = {k: v for k, v in parent.items() if k.startswith("mlflow.source.")}
    run_tags = {**source, "mlflow.parentRunId": parent_run_id,
                **{k: str(v) for k, v in (tags or {}).items()}}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=run_tags) as run:
        yield StageRun(run, mlflow.MlflowClient())


def attach_run(uri: str, run_id: str) -> StageRun:
    """Log into an existing run from another process (Ray Train's rank 0 into its stage's run)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return StageRun(client.get_run(run_id), client)
