"""The browser editor's second source (pipelines/app.py ``--registry``): an edit model registered
in MLflow is listed beside the models folder's attributes, fetched into the app's cache on first
use, and edits exactly as the same files do from the folder. Talks to the app's JSON API (the
page's own calls) without a browser: tests/test_app.py drives the page itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hfedit.config import HfeditConfig
from hfedit.data.images import save_png
from hfedit.models.backbone import save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.models.rectifier import build_rectifier
from tests.conftest import perturbed, real_faces, tracking_store
from tests.servers import free_port, stop, wait_until_up

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, random_denoiser):
    """models/backbone + models/edits/smiling on disk, and the same files logged and registered
    (``hfedit-backbone``, ``hfedit-edit-smiling``) in a SQLite store of their own."""
    import mlflow

    from pipelines import serving
    from pipelines.tracking import experiment_id

    tmp = tmp_path_factory.mktemp("app-registry")
    cfg = HfeditConfig()
    models = tmp / "models"
    save_backbone(random_denoiser, models / "backbone")
    rect = perturbed(build_rectifier(cfg.rectifier, random_denoiser.unet), scale=0.2, seed=5)
    save_rectifier(models / "edits" / "smiling", rect, {"attribute": "smiling"})
    save_png(real_faces(1)[0], tmp / "face.png")
    with tracking_store(f"sqlite:///{tmp}/mlflow.db") as uri, \
            mlflow.start_run(experiment_id=experiment_id(cfg)) as run:
        serving.log_backbone_model(cfg, run.info.run_id, models / "backbone")
        serving.log_rectifier_model(cfg, run.info.run_id, models / "backbone",
                                    models / "edits" / "smiling", "edit-smiling", "smiling")
    return {"tmp": tmp, "uri": uri}


def _call(url: str, data: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _edit(url: str, attribute: str, face: bytes) -> bytes:
    """Submit ``face`` as the page does, follow the job, return the edit's PNG."""
    job = _call(f"{url}/api/jobs?attribute={attribute}&num_steps=4&skip=1&seed=2&name=face.png",
                face)["id"]
    deadline = time.monotonic() + 240
    while (state := _call(f"{url}/api/jobs/{job}"))["state"] not in ("done", "error"):
        assert time.monotonic() < deadline, state
        time.sleep(0.25)
    assert state["state"] == "done", state["message"]
    with urllib.request.urlopen(url + state["result"]["images"]["edit"], timeout=30) as r:
        return r.read()


def test_a_registered_edit_model_edits_as_its_folder_does(registry):
    tmp = registry["tmp"]
    port, log = free_port(), tmp / "app.log"
    env = {**os.environ, "HFEDIT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the flag names the store
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.app", "--models", str(tmp / "models"),
             "--registry", registry["uri"], "--port", str(port), "--threads", "1", "--cache",
             str(tmp / "cache")], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/api/info", proc, log, timeout=180)
        info = _call(url + "/api/info")
        assert {a["id"]: a["label"] for a in info["attributes"]} == {
            "folder:smiling": "smiling (models folder)",
            "registry:hfedit-edit-smiling/1": "smiling (registry: version 1 @champion)"}
        assert info["notes"] == []
        face = (tmp / "face.png").read_bytes()
        from_registry = _edit(url, "registry:hfedit-edit-smiling/1", face)
        from_folder = _edit(url, "folder:smiling", face)
        assert from_registry == from_folder  # the same files, the same front door: same PNG
        fetched = tmp / "cache" / "registry" / "hfedit-edit-smiling" / "1"
        assert (fetched / "edits" / "smiling" / "rectifier.safetensors").is_file()
        assert (fetched / "backbone").is_dir()
    finally:
        stop(proc)
