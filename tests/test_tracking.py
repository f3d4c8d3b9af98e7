"""MLflow at the edge (pipelines/tracking.py): where a store keeps its artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfedit.config import load_config
from pipelines.tracking import artifact_location, stage_run


def test_artifacts_go_beside_a_sqlite_store_elsewhere_not_into_the_project(tmp_path, monkeypatch):
    project, store = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    store.mkdir()
    (project / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("HFEDIT_ROOT", str(project))
    monkeypatch.delenv("HFEDIT_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(params=root / "params.yaml", conf_dir=root / "conf")
    with stage_run(cfg, "prepare") as tracker:
        tracker.log_text("hello\n", "note.txt")
        uri = tracker.run.info.artifact_uri
    assert uri.startswith((store / "mlartifacts").as_uri())
    assert [p.read_text() for p in (store / "mlartifacts").rglob("note.txt")] == ["hello\n"]
    assert not (project / "mlartifacts").exists()


def test_artifact_locations_of_each_kind_of_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HFEDIT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert artifact_location("sqlite:////data/runs/mlflow.db") == "file:///data/runs/mlartifacts"
    assert artifact_location("sqlite:///sub/m.db?timeout=20") == (tmp_path / "sub/mlartifacts").as_uri()
    assert artifact_location("sqlite:///:memory:") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_an_uploaded_copy_keeps_its_store_beside_the_results(tmp_path, monkeypatch):
    """Under `ray job submit` the project is Ray's unpacked copy of the working directory: the
    default store goes beside the job's results, not into that temporary copy."""
    from pipelines.tracking import tracking_uri, uploaded_copy

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(params=root / "params.yaml", conf_dir=root / "conf")
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HFEDIT_ROOT", str(copy))
    assert uploaded_copy(copy) and not uploaded_copy(root)
    assert tracking_uri(cfg, beside=tmp_path / "out") == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert tracking_uri(cfg) == f"sqlite:///{copy / 'mlflow.db'}"  # a stage that has no results folder
    monkeypatch.setenv("HFEDIT_ROOT", str(root))
    assert tracking_uri(cfg, beside=tmp_path / "out") == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    monkeypatch.setenv("HFEDIT_ROOT", str(copy))
    assert tracking_uri(cfg, beside=tmp_path / "out") == "sqlite:////elsewhere/m.db"


def _cfg():
    root = Path(__file__).resolve().parents[1]
    return load_config(params=root / "params.yaml", conf_dir=root / "conf")


def test_a_stage_logs_its_own_sections_not_the_whole_config():
    from hfedit.config import to_flat_dict
    from pipelines.tracking import stage_params

    cfg = _cfg()
    edits = stage_params(cfg, "train_edits")
    assert {"profile", "runtime.device", "edits.attributes.smiling.lr", "clip.model"} <= set(edits)
    assert not any(k.startswith(("backbone.", "data.", "pretrain.", "edit_batch.")) for k in edits)
    prepare = stage_params(cfg, "prepare")
    assert {k.split(".")[0] for k in prepare} == {"profile", "runtime", "data"}
    assert len(prepare) < 15 < len(to_flat_dict(cfg))
    assert stage_params(cfg, "a_stage_of_someone_else") == to_flat_dict(cfg)


def test_pipeline_runs_are_named_by_the_dvc_experiment_or_the_time(monkeypatch):
    import re

    from pipelines.tracking import pipeline_run_name

    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lobe")
    assert pipeline_run_name() == "lucky-lobe"
    monkeypatch.delenv("DVC_EXP_NAME")
    assert re.fullmatch(r"pipeline-\d{8}-\d{6}", pipeline_run_name())


def test_a_nested_run_in_another_process_keeps_the_stages_source_and_commit(tmp_path, monkeypatch):
    """Runs made in Ray tasks showed source default_worker.py and no git commit."""
    import mlflow

    from pipelines.tracking import child_run, experiment_id

    monkeypatch.delenv("HFEDIT_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = _cfg()
    exp = experiment_id(cfg)
    client = mlflow.MlflowClient()
    parent = client.create_run(exp, tags={"mlflow.source.name": "pipelines/train_edits.py",
                                          "mlflow.source.git.commit": "0123abcd" * 5})
    with child_run(mlflow.get_tracking_uri(), exp, parent.info.run_id, "edit:smiling") as run:
        run_id = run.run_id
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == "pipelines/train_edits.py"
    assert tags["mlflow.source.git.commit"] == "0123abcd" * 5
    assert tags["mlflow.parentRunId"] == parent.info.run_id


def _cfg_in(project: Path, monkeypatch):
    (project / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("HFEDIT_ROOT", str(project))
    monkeypatch.delenv("HFEDIT_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path(__file__).resolve().parents[1]
    return load_config(params=root / "params.yaml", conf_dir=root / "conf")


def test_a_copied_project_writes_into_its_own_store_and_opens_on_its_runs(tmp_path, monkeypatch):
    """MLflow records absolute artifact locations: the copy's runs must not write into the
    original's mlartifacts/, and the original's artifacts must be readable in the copy."""
    import shutil

    import mlflow

    first, copy = tmp_path / "first", tmp_path / "copy"
    first.mkdir()
    cfg = _cfg_in(first, monkeypatch)
    with stage_run(cfg, "prepare") as tracker:
        tracker.log_text("before the move\n", "note.txt")
        old_run = tracker.run_id
    shutil.copytree(first, copy)
    shutil.rmtree(first / "mlartifacts")  # the original is gone (moved, or cleaned up)

    cfg = _cfg_in(copy, monkeypatch)
    with stage_run(cfg, "backbone") as tracker:
        tracker.log_text("after the move\n", "note.txt")
        new_uri = tracker.run.info.artifact_uri
    assert new_uri.startswith((copy / "mlartifacts").as_uri() + "/")
    assert not (first / "mlartifacts").exists()
    client = mlflow.MlflowClient(f"sqlite:///{copy}/mlflow.db")
    got = Path(client.download_artifacts(old_run, "note.txt", str(tmp_path / "dl")))
    assert got.read_text() == "before the move\n"
    exp = client.get_experiment_by_name(cfg.runtime.mlflow.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # training runs view


def test_a_stage_stopped_by_sigterm_ends_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    (tmp_path / "params.yaml").write_text("{}\n")
    root = Path(__file__).resolve().parents[1]
    child = (
        "import time\n"
        "from hfedit.config import load_config\n"
        "from pipelines.tracking import stage_run\n"
        f"cfg = load_config(params={str(root / 'params.yaml')!r}, conf_dir={str(root / 'conf')!r})\n"
        "with stage_run(cfg, 'evaluate'):\n"
        "    print('running', flush=True)\n"
        "    time.sleep(120)\n")
    env = {**os.environ, "HFEDIT_ROOT": str(tmp_path), "MLFLOW_TRACKING_URI":
           f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(root)}
    env.pop("HFEDIT_PARENT_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not lines or lines[-1].strip() != "running":  # MLflow logs its set-up first
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"


@pytest.mark.timeout(300)
def test_a_tracking_server_keeps_artifacts_in_s3(tmp_path, monkeypatch, s3_server):
    """A shared `mlflow server --artifacts-destination s3://...` (boto3 is in the environment):
    a stage's artifacts land in the bucket, through the server, with no local mlartifacts/."""
    import subprocess
    import sys

    import boto3

    from tests.servers import free_port, stop, wait_until_up

    bucket = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket.create_bucket(Bucket="hfedit-mlflow")
    port = free_port()
    env = {**os.environ, **s3_server["env"], "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"],
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri",
         f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", "s3://hfedit-mlflow/art"],
        env=env, cwd=tmp_path, stdout=open(tmp_path / "server.log", "wb"),
        stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, tmp_path / "server.log", 120)
        project = tmp_path / "project"
        project.mkdir()
        cfg = _cfg_in(project, monkeypatch)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        with stage_run(cfg, "prepare") as tracker:
            tracker.log_text("in the bucket\n", "note.txt")
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="hfedit-mlflow")["Contents"]]
        (note,) = [k for k in keys if k.endswith("note.txt")]
        body = bucket.get_object(Bucket="hfedit-mlflow", Key=note)["Body"].read()
        assert body == b"in the bucket\n" and not (project / "mlartifacts").exists()
    finally:
        stop(server, timeout=60)
