"""Shared fixtures: tiny real models on the CPU and real images that ship inside packages."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfedit.models.backbone import Denoiser, new_denoiser
from hfedit.config import HfeditConfig, RectifierConfig, RectifierTrunk

RES = 32
# The tests' rectifier: a ResNet-18 trunk and narrow branches, fast on the CPU.
SMALL_RECTIFIER = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16,
                                  time_embed_dim=32)
# torch's thread count in a fresh process of this environment (conftest is imported before any
# test): a model served by another process computes with it, and CPU convolutions round
# differently with another count (the plain tiny U-Net's eps by ~1e-6 between 1 and 2 threads)
DEFAULT_THREADS = torch.get_num_threads()


def real_faces(n: int, resolution: int = RES) -> torch.Tensor:
    """``n`` real photographs at ``resolution`` in [-1, 1]: scikit-image's astronaut and LFW
    face crops (both ship inside the scikit-image wheel)."""
    from skimage import data

    astro = torch.tensor(data.astronaut()[30:230, 140:340], dtype=torch.float32).permute(2, 0, 1)
    lfw = torch.tensor(np.asarray(data.lfw_subset()[: max(n - 1, 0)]), dtype=torch.float32)
    faces = [F.interpolate(astro[None] / 255.0, size=resolution, mode="bicubic", antialias=True)]
    if n > 1:
        grey = lfw[:, None].repeat(1, 3, 1, 1)
        faces.append(F.interpolate(grey, size=resolution, mode="bicubic", align_corners=False))
    return (torch.cat(faces)[:n].clamp(0, 1) * 2 - 1).contiguous()


def prepared_faces(out, n: int, val_fraction: float = 0.25, resolution: int = RES):
    """A prepared dataset folder ``out`` (hfedit.data.prepared) of ``real_faces(n)``, through the
    prepare stage's own code: PNG files in ``out``/../faces-src, then ``prepare_dataset``."""
    from pathlib import Path

    from hfedit.config import DataConfig
    from hfedit.data.images import save_png
    from hfedit.data.prepared import prepare_dataset

    out = Path(out)
    src = out.parent / f"{out.name}-src"
    for i, face in enumerate(real_faces(n, resolution)):
        save_png(face, src / f"face{i:03d}.png")
    prepare_dataset(DataConfig(source=str(src), resolution=resolution, val_fraction=val_fraction),
                    out, progress=False)
    return out


def perturbed(rect, scale: float = 0.05, seed: int = 0):
    """A copy of a rectifier whose A heads are no longer zero: Delta != 0 and differs between
    samples (a stand-in for a trained rectifier)."""
    import copy

    rect = copy.deepcopy(rect)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in rect.head_a:
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * scale)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * scale)
    return rect


def perturbed_rectifier(denoiser: Denoiser, scale: float = 0.05, seed: int = 0):
    """A :data:`SMALL_RECTIFIER` on ``denoiser``'s U-Net, built after ``torch.manual_seed(seed)``,
    its A heads then :func:`perturbed` by ``scale`` with ``seed``: a stand-in for a trained
    (reconstruction or edit) rectifier."""
    from hfedit.models.rectifier import build_rectifier

    torch.manual_seed(seed)
    return perturbed(build_rectifier(SMALL_RECTIFIER, denoiser.unet), scale, seed)


def tiny_models(folder, denoiser, attributes=("smiling", "old")):
    """``folder`` laid out as the pipeline's models/ after ``./dev run``: ``backbone/``,
    ``edits/<attribute>/`` (rectifiers perturbed so that an edit moves the image: stand-ins for
    trained ones) and ``rectifier/`` (an untrained reconstruction rectifier). Returns ``folder``."""
    from pathlib import Path

    from hfedit.models.backbone import save_backbone
    from hfedit.models.checkpoint import save_rectifier
    from hfedit.models.rectifier import build_rectifier

    folder = Path(folder)
    save_backbone(denoiser, folder / "backbone")
    cfg = HfeditConfig().rectifier
    for seed, name in enumerate(attributes):
        rect = perturbed(build_rectifier(cfg, denoiser.unet), scale=0.2, seed=seed)
        save_rectifier(folder / "edits" / name, rect, {"attribute": name})
    save_rectifier(folder / "rectifier", build_rectifier(cfg, denoiser.unet))
    return folder


def project_params(folder, num_steps: int = 8):
    """``folder`` made a project root: the repository's params.yaml (with ``inversion.num_steps``
    set to ``num_steps``, to keep tests short) and conf/. Returns ``folder``."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = (root / "params.yaml").read_text()
    assert "\n  num_steps: 50" in text, "params.yaml's inversion.num_steps moved: update this"
    (folder / "params.yaml").write_text(text.replace("\n  num_steps: 50", f"\n  num_steps: {num_steps}", 1))
    shutil.copytree(root / "conf", folder / "conf", dirs_exist_ok=True)
    return folder


@contextlib.contextmanager
def tracking_store(uri: str):
    """``MLFLOW_TRACKING_URI`` and MLflow's current store set to ``uri`` for the block (a test's
    own store), the variable restored after it."""
    import mlflow

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def briefly_trained(backbone_cfg, images: torch.Tensor, steps: int) -> Denoiser:
    """The configured backbone trained ``steps`` steps on ``images`` (no checkpoints), frozen:
    a model whose eps means something, for benchmarks."""
    import tempfile

    from hfedit.training.backbone import train_backbone

    backbone_cfg.train.steps, backbone_cfg.train.checkpoint_every = steps, 10**9
    backbone_cfg.train.warmup_steps = min(backbone_cfg.train.warmup_steps, steps // 4)
    return train_backbone(backbone_cfg, images, tempfile.mkdtemp(prefix="hfedit-bb"),
                          show_progress=False).denoiser.freeze()


@pytest.fixture(scope="session")
def faces() -> torch.Tensor:
    return real_faces(4)


@pytest.fixture(scope="session")
def tiny_cfg() -> HfeditConfig:
    return HfeditConfig()


@pytest.fixture(scope="session")
def random_denoiser(tiny_cfg) -> Denoiser:
    """The default tiny UNet2DModel architecture with seeded random weights."""
    torch.manual_seed(0)
    return new_denoiser(tiny_cfg.backbone, RES).freeze()


@pytest.fixture(scope="session")
def trained_denoiser(tiny_cfg, tmp_path_factory) -> Denoiser:
    """The tiny backbone briefly trained on real faces (a model whose eps means something)."""
    from hfedit.training.backbone import train_backbone

    cfg = tiny_cfg.backbone
    cfg = type(cfg)(**{**cfg.__dict__, "train": type(cfg.train)(
        **{**cfg.train.__dict__, "steps": 120, "warmup_steps": 10, "checkpoint_every": 1000}
    )})
    result = train_backbone(cfg, real_faces(64), tmp_path_factory.mktemp("bb"), show_progress=False)
    return result.denoiser


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto's) on 127.0.0.1, started for the tests and stopped by its
    PID; yields ``{"endpoint": url, "env": AWS_* variables to talk to it}``."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.servers import free_port, stop, wait_until_up

    port = free_port()
    folder = tmp_path_factory.mktemp("s3")
    log = open(folder / "moto.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{endpoint}/moto-api/", server, folder / "moto.log", 60)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        yield {"endpoint": endpoint, "env": env}
    finally:
        stop(server)
        log.close()
