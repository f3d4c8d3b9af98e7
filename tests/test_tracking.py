"""MLflow at the edge (pipelines/tracking.py): where a store keeps its artifacts."""

from __future__ import annotations

from pathlib import Path

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
