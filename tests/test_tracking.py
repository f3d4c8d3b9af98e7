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
