"""Rectifiers as MLflow pyfunc models (pipelines/serving.py): logged with a signature, registered
with the alias ``champion`` and tags, loaded by ``mlflow.pyfunc.load_model`` and served by a real
``mlflow models serve`` process on 127.0.0.1 answering base64 PNG in, PNG out."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hfedit.models.backbone import new_denoiser, save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.config import HfeditConfig, RectifierTrunk
from hfedit.data.images import load_image, to_pil, to_tensor
from hfedit.editing.editor import Editor
from hfedit.models.rectifier import build_rectifier
from tests.conftest import DEFAULT_THREADS, RES, perturbed, tracking_store
from tests.servers import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _b64_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random backbone, a perturbed (ResNet18) edit rectifier sharing the trunk of a
    reconstruction rectifier, all on disk, logged and registered as ``hfedit-edit-smiling`` in
    a SQLite store of their own."""
    import mlflow

    from pipelines.serving import log_backbone_model, log_rectifier_model
    from pipelines.tracking import experiment_id

    tmp = tmp_path_factory.mktemp("serving")
    cfg = HfeditConfig()
    cfg.rectifier.trunk = RectifierTrunk.resnet18
    torch.manual_seed(0)
    denoiser = new_denoiser(cfg.backbone, RES).freeze()
    save_backbone(denoiser, tmp / "backbone")
    recon = build_rectifier(cfg.rectifier, denoiser.unet)
    save_rectifier(tmp / "rectifier", recon)
    rect = perturbed(recon, scale=0.05)  # the heads differ, the trunk is shared
    save_rectifier(tmp / "smiling", rect, {"attribute": "smiling"}, base=tmp / "rectifier")
    with tracking_store(f"sqlite:///{tmp}/mlflow.db") as uri:
        with mlflow.start_run(experiment_id=experiment_id(cfg)) as run:
            backbone_version = log_backbone_model(cfg, run.info.run_id, tmp / "backbone")
            version = log_rectifier_model(
                cfg, run.info.run_id, tmp / "backbone", tmp / "smiling", "edit-smiling", "smiling",
                tags={"hfedit.attribute": "smiling", "hfedit.semantic": "false"})
        yield {"tmp": tmp, "uri": uri, "version": version, "denoiser": denoiser, "rect": rect,
               "backbone_version": backbone_version,
               "cfg": cfg, "run_id": run.info.run_id}


def _expected_png(served, path: Path, seed: int, threads: int | None = None) -> np.ndarray:
    """The edit computed in this process, without MLflow, as 8-bit pixels; ``threads``: with
    that many torch threads (a served model's process runs with the default count, and other
    tests leave this process at another one; the contract is bit-identical PNGs at one thread
    count)."""
    import dataclasses

    cfg = served["cfg"]
    x0 = to_tensor(load_image(path, cfg.data.max_pixels).image, RES)[None]
    editor = Editor(served["denoiser"], dataclasses.replace(cfg.inversion, num_steps=STEPS),
                    {"smiling": served["rect"]})
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        out = editor.edit(x0, [seed], names=("smiling",)).outputs["smiling"][0].clamp(-1, 1)
    finally:
        torch.set_num_threads(before)
    return np.asarray(to_pil(out)), np.asarray(to_pil(x0[0]))


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _astronaut(tmp: Path) -> Path:
    from skimage import data

    path = tmp / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_registered_model_has_signature_alias_tags_and_portable_files(served):
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("hfedit-edit-smiling", "champion")
    assert str(mv.version) == served["version"]
    assert mv.tags["hfedit.semantic"] == "false" and mv.tags["hfedit.attribute"] == "smiling"
    assert client.get_registered_model("hfedit-edit-smiling").tags["hfedit.semantic"] == "false"
    info = mlflow.models.get_model_info("models:/hfedit-edit-smiling@champion")
    assert [c.name for c in info.signature.inputs.inputs] == ["image", "seed"]
    assert {p.name: p.default for p in info.signature.params.params}["num_steps"] == 50
    local = Path(mlflow.artifacts.download_artifacts("models:/hfedit-edit-smiling@champion"))
    # the backbone is linked, not copied: the registered backbone model with the same weights
    linked = f"models:/hfedit-backbone/{served['backbone_version']}"
    assert mv.tags["hfedit.backbone_model"] == linked
    from mlflow.models import Model

    assert Model.load(str(local)).flavors["python_function"]["config"]["backbone_model"] == linked
    assert not list(local.rglob("diffusion_pytorch_model.safetensors"))
    metas = {p.parent.name: json.loads(p.read_text()) for p in local.rglob("rectifier.json")}
    assert set(metas) == {"smiling", "rectifier"}  # the edit and the base whose trunk it shares
    assert metas["smiling"]["base"]["path"] == "../rectifier"
    assert str(served["tmp"]) not in json.dumps(metas)
    # everything written into the store is readable by other users of a shared store
    store = served["tmp"] / "mlartifacts"
    modes = {p.relative_to(store): p.stat().st_mode & 0o777 for p in store.rglob("*")}
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), \
        {str(p): oct(m) for p, m in modes.items() if m & 0o044 != 0o044}


def test_pyfunc_edits_like_the_library_and_reports_bad_rows(served):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/hfedit-edit-smiling@champion")
    src = _astronaut(served["tmp"])
    request = pd.DataFrame({"image": [base64.b64encode(src.read_bytes()).decode(),
                                      base64.b64encode(b"not an image").decode()],
                            "seed": [7, 7]})
    out = model.predict(request, params={"num_steps": STEPS})
    expected, source = _expected_png(served, src, seed=7)
    got = _decode(out["image"][0])
    assert got.shape == (RES, RES, 3) and (out["width"][0], out["height"][0]) == (RES, RES)
    assert np.array_equal(got, expected)
    assert np.abs(got.astype(int) - source.astype(int)).max() > 0  # the rectifier did edit
    assert out["error"][0] == "" and out["image"][1] == ""
    assert "not_an_image" in out["error"][1]


def test_the_registered_backbone_reconstructs_exactly(served):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/hfedit-backbone@champion")
    src = _astronaut(served["tmp"])
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(src.read_bytes()).decode()]}),
                        params={"num_steps": STEPS})
    _, source = _expected_png(served, src, seed=0)
    assert out["error"][0] == "" and np.array_equal(_decode(out["image"][0]), source)


@pytest.mark.timeout(600)
def test_mlflow_models_serve_answers_an_edit_request(served):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["uri"], "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(served["tmp"] / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", "models:/hfedit-edit-smiling@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, served["tmp"] / "serve.log", 300)
        src = _astronaut(served["tmp"])
        body = json.dumps({"dataframe_records": [
            {"image": base64.b64encode(src.read_bytes()).decode(), "seed": 3}],
            "params": {"num_steps": STEPS}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        row = answer["predictions"][0]
        assert row["error"] == ""
        expected, _ = _expected_png(served, src, seed=3, threads=DEFAULT_THREADS)
        assert np.array_equal(_decode(row["image"]), expected)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def test_edit_batch_takes_a_registered_model_uri(served, tmp_path):
    """``edit_batch --edits models:/hfedit-edit-smiling@champion``: the model's rectifier, its
    base and its backbone are fetched under <out>/_models and edit exactly as the library does."""
    from hfedit.config import load_config
    from pipelines import edit_batch as eb

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    src = _astronaut(photos)
    args = eb.parse_args(["--input", str(photos), "--out", str(out), "--edits",
                          "models:/hfedit-edit-smiling@champion", "--attributes", "reconstruction"])
    eb.resolve_model_uris(args)
    assert args.attributes == ["reconstruction", "smiling"] and args.backbone.startswith(str(out))
    cfg = load_config(overrides=[f"edit_batch.edits_dir={args.edits}", f"inversion.num_steps={STEPS}",
                                 "edit_batch.attributes=[reconstruction,smiling]"])
    result = eb.run_job(cfg, photos, out, args.backbone, progress=False, executor=eb.execute_plain)
    assert result.exit_code == 0 and result.manifest.id.tolist() == ["astronaut.png"] * 2
    # bit for bit at the actor's thread count: the job loads the backbone from disk into
    # aligned memory (hfedit.models.backbone._aligned), so its convs are the in-memory model's
    expected, _ = _expected_png(served, src, seed=eb.image_seed(cfg.inversion.seed, "astronaut.png"),
                                threads=max(1, cfg.edit_batch.torch_threads))
    got = np.asarray(Image.open(out / "smiling" / "astronaut.png").convert("RGB"))
    assert np.array_equal(got, expected)


def test_a_registered_model_loads_as_the_front_door(served, tmp_path):
    """``pipelines.serving.load_pipeline("models:/...@champion")``: the registered rectifier, its
    shared trunk and its backbone, fetched, edit as the library's own objects do."""
    import dataclasses

    from pipelines.serving import load_pipeline

    cfg = served["cfg"]
    pipe = load_pipeline("models:/hfedit-edit-smiling@champion", tmp_path / "fetched",
                         attributes=["smiling"],
                         inversion=dataclasses.replace(cfg.inversion, num_steps=STEPS))
    assert pipe.attributes == ["smiling"]
    src = _astronaut(tmp_path)
    out = pipe(src, attributes="smiling", seed=3)
    expected, _ = _expected_png(served, src, seed=3)
    assert np.array_equal(np.asarray(out.images["smiling"][0]), expected)
