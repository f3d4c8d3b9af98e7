"""Reconstruction pretraining: the loss goes down, checkpoints round-trip, sampling through the
rectified model, and Ray Train (2 CPU workers, DDP) survives a killed worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hfedit.models.checkpoint import (
    checkpoint_complete,
    load_rectifier,
    save_checkpoint,
    save_rectifier,
)
from hfedit.config import RectifierConfig, RectifierTrunk
from hfedit.diffusion.inversion import ddim_invert, ddim_sample, invert, replay
from hfedit.models.rectifier import ModulatedDenoiser, build_rectifier
from hfedit.diffusion.schedule import q_sample
from hfedit.training.reconstruction import (
    ReconstructionObjective,
    make_optimizer,
    reconstruction_step,
)
from tests.conftest import perturbed_rectifier, prepared_faces, real_faces

SMALL = RectifierConfig(trunk=RectifierTrunk.resnet18, branch_channels=16, time_embed_dim=32)
ROOT = Path(__file__).resolve().parents[1]


def _held_out_gap(model, x0, seed=123):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        return (model(q_sample(model.schedule, x0, t, eps), t, x0) - eps).pow(2).mean().item()


def test_short_run_lowers_the_noise_fitting_loss(trained_denoiser):
    torch.manual_seed(0)
    model = ModulatedDenoiser(trained_denoiser, build_rectifier(SMALL, trained_denoiser.unet))
    backbone = {k: v.clone() for k, v in trained_denoiser.state_dict().items()}
    x0 = real_faces(8)
    before = _held_out_gap(model, x0)
    opt, _ = make_optimizer(model.rectifier, 1e-3, 1e-5, 5000, 0.9)
    objective = ReconstructionObjective(model, "noise")
    for step in range(40):
        reconstruction_step(objective, opt, x0, torch.Generator().manual_seed(step), 1000)
    after = _held_out_gap(model, x0)
    assert after < 0.8 * before, (before, after)
    for name, value in trained_denoiser.state_dict().items():
        assert torch.equal(value, backbone[name]), name


@pytest.mark.parametrize("kind", ["l1", "l1_dw"])
def test_image_space_losses_are_selectable(random_denoiser, faces, kind):
    model = ModulatedDenoiser(random_denoiser, build_rectifier(SMALL, random_denoiser.unet))
    objective = ReconstructionObjective(model, kind, dw_weight=10.0)
    t, eps = torch.full((4,), 500), torch.randn(faces.shape)
    loss, step = objective(faces, t, eps)
    x0_hat = (q_sample(model.schedule, faces, t, eps) - (1 - model.schedule.alphas_cumprod[500]).sqrt().float() * step.eps_hat) / model.schedule.alphas_cumprod[500].sqrt().float()
    # Delta = 0 at initialisation, so the delta-weight penalty adds nothing yet.
    assert loss.item() == pytest.approx((x0_hat - faces).abs().mean().item(), rel=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.rectifier.parameters())


def test_rectifier_checkpoint_round_trip(random_denoiser, faces, tmp_path):
    rect = perturbed_rectifier(random_denoiser, 0.02)
    save_rectifier(tmp_path, rect, {"step": 7})
    loaded, meta = load_rectifier(tmp_path, random_denoiser.unet)
    assert meta["step"] == 7 and meta["target_names"] == list(rect.target_names)
    a = ModulatedDenoiser(random_denoiser, rect)(faces, 300, faces)
    b = ModulatedDenoiser(random_denoiser, loaded)(faces, 300, faces)
    assert torch.equal(a, b)
    assert not torch.allclose(a, random_denoiser(faces, 300), atol=1e-4)


def test_checkpoint_for_another_backbone_is_refused(random_denoiser, tmp_path):
    from hfedit.models.backbone import build_unet
    from hfedit.config import UNetConfig

    save_rectifier(tmp_path, perturbed_rectifier(random_denoiser, 0.02))
    other = build_unet(UNetConfig(block_out_channels=[32, 64], down_block_types=["DownBlock2D"] * 2,
                                  up_block_types=["UpBlock2D"] * 2), 32)
    with pytest.raises(ValueError, match="other target convs"):
        load_rectifier(tmp_path, other)


def test_sampling_through_the_rectified_model(trained_denoiser, faces):
    d = trained_denoiser
    untrained = ModulatedDenoiser(d, build_rectifier(SMALL, d.unet)).conditioned(faces)
    x_T = ddim_invert(d, d.schedule, faces, 10).xts[0]
    assert torch.allclose(ddim_sample(untrained, d.schedule, x_T, 10),
                          ddim_sample(d, d.schedule, x_T, 10), atol=1e-4)
    rectified = ModulatedDenoiser(d, perturbed_rectifier(d, 0.02)).conditioned(faces)
    inv = invert(rectified, d.schedule, faces, 10, generator=torch.Generator().manual_seed(0))
    assert (replay(rectified, d.schedule, inv) - faces).abs().max() <= 1e-5
    assert (replay(d, d.schedule, inv) - faces).abs().max() > 1e-3  # a different model edits


# ----------------------------------------------------------------------- Ray Train (real)
def _prepared(tmp_path, random_denoiser):

    from hfedit.models.backbone import save_backbone

    save_backbone(random_denoiser, tmp_path / "backbone")
    data = prepared_faces(tmp_path / "data", 12, val_fraction=1 / 3)  # 8 train, 4 val
    return tmp_path / "backbone", data


def _run_stage(tmp_path, backbone, data, extra=(), pid_dir="", batch_log="", ckpt="ckpt"):
    sets = ["rectifier.trunk=resnet18", "rectifier.branch_channels=16", "rectifier.time_embed_dim=32",
            "pretrain.steps=8", "pretrain.batch_size=2", "pretrain.checkpoint_every=2",
            "pretrain.log_every=2", "pretrain.eval_steps=5", "pretrain.eval_images=2",
            "runtime.ray.num_workers=2", "runtime.ray.cpus_per_worker=0.5", *extra]
    cmd = [sys.executable, str(ROOT / "pipelines" / "pretrain_rectifier.py"),
           "--backbone", str(backbone), "--data", str(data), "--out", str(tmp_path / "rect"),
           "--checkpoints", ckpt if "://" in ckpt else str(tmp_path / ckpt), "--metrics", str(tmp_path / "m.json"),
           "--pid-dir", pid_dir, "--batch-log", batch_log] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "HFEDIT_ROOT": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_trainer_survives_a_killed_worker_and_resumes(tmp_path, random_denoiser, monkeypatch):
    """The killed run reads its data from a bucket and keeps its checkpoints there (Ray Train's
    storage_path), as on a cluster of nodes with their own disks; the clean run is local."""
    import json

    from hfedit.storage import Location
    from tests.servers import S3_BUCKET, s3_server

    backbone, data = _prepared(tmp_path, random_denoiser)
    pid_dir = tmp_path / "pids"
    logs = {run: tmp_path / f"batches-{run}" for run in ("killed", "clean")}
    for folder in logs.values():
        folder.mkdir()
    with s3_server(tmp_path) as store:
        for key, value in store.items():
            monkeypatch.setenv(key, value)
        bucket = Location(f"s3://{S3_BUCKET}")
        for path in (p for p in Path(data).rglob("*") if p.is_file()):
            bucket.write_bytes(f"data/{path.relative_to(data).as_posix()}", path.read_bytes())
        on_bucket = dict(batch_log=str(logs["killed"]), ckpt=bucket.name("ckpt"),
                         extra=["pretrain.steps=20", "pretrain.checkpoint_every=5"])
        proc = _run_stage(tmp_path, backbone, bucket.name("data"), pid_dir=str(pid_dir), **on_bucket)
        killed = threading.Event()
        killed_pid: list[int] = []

        def complete_on_bucket() -> bool:  # a checkpoint's tensors object of its recorded size
            files = bucket.files("ckpt")
            for rel in (r for r in files if r.endswith("/train_state.json")):
                meta = json.loads(bucket.read_bytes(rel))
                if files.get(rel[: -len("json")] + "safetensors") == meta.get("data_bytes"):
                    return True
            return False

        def kill_rank1_after_a_checkpoint():
            # Once a whole checkpoint is on the store the restarted group must resume from it,
            # whether or not Ray had committed it when the worker died
            # (pretrain_rectifier._resume_point).
            deadline = time.time() + 400
            while time.time() < deadline and proc.poll() is None:
                pid_file = pid_dir / "rank1.pid"
                if pid_file.exists() and complete_on_bucket():
                    killed_pid.append(int(pid_file.read_text()))
                    os.kill(killed_pid[0], signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.5)

        threading.Thread(target=kill_rank1_after_a_checkpoint, daemon=True).start()
        out, _ = proc.communicate(timeout=550)
        assert proc.returncode == 0, out[-4000:]
        assert killed.is_set()
        report = json.loads((tmp_path / "m.report.json").read_text())
        assert report["training"]["step"] == 20
        # Ray restarted the worker group (rank 1 is a new process), which resumed from the
        # checkpoint on the bucket (restarts counts resumptions) and completed.
        assert int((pid_dir / "rank1.pid").read_text()) != killed_pid[0], out[-3000:]
        assert report["training"]["restarts"] >= 1, out[-3000:]
        assert (tmp_path / "rect" / "rectifier.safetensors").is_file()
        for model in ("backbone", "rectifier"):
            assert report[model]["edit_friendly_max_error"] <= 1e-4
        kept = [json.loads(bucket.read_bytes(r))["step"] for r in bucket.files("ckpt")
                if r.endswith("/train_state.json")]
        assert sorted(kept) == [15, 20]  # every 5 steps, the newest two kept (num_to_keep)

        # A rerun with the same config resumes from the bucket's final checkpoint: no step is
        # trained again.
        proc = _run_stage(tmp_path, backbone, bucket.name("data"), **on_bucket)
        out, _ = proc.communicate(timeout=550)
        assert proc.returncode == 0, out[-4000:]
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["training"]["resumed_from_step"] == 20
    assert not (ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()
    # the rectifier records its backbone portably and is a servable model, @champion
    meta = json.loads((tmp_path / "rect" / "rectifier.json").read_text())
    assert meta["backbone"]["source"] == "backbone" and str(tmp_path) not in json.dumps(meta)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    champion = client.get_model_version_by_alias("hfedit-rectifier", "champion")
    latest = client.get_model_version("hfedit-rectifier", "2")
    # the rerun registered version 2; champion stays on 1 until promoted
    assert str(champion.version) == "1" and latest.tags["hfedit.kind"] == "reconstruction"
    from pipelines.serving import promote

    assert promote("hfedit-rectifier", "latest", f"sqlite:///{tmp_path}/mlflow.db") == "2"
    assert str(client.get_model_version_by_alias("hfedit-rectifier", "champion").version) == "2"

    # The streamed batches are a function of the seed: a run that was never interrupted (local
    # data and checkpoints) sees, on every rank and at every step, the images the killed-and-
    # resumed run saw (the resumed group re-reads its epoch and continues mid-way), across
    # epochs (8 images / 2 ranks / 2).
    shutil.rmtree(tmp_path / "rect")
    proc = _run_stage(tmp_path, backbone, data, batch_log=str(logs["clean"]), ckpt="ckpt-clean",
                      extra=["pretrain.steps=20", "pretrain.checkpoint_every=10"])
    out, _ = proc.communicate(timeout=550)
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "rect" / "rectifier.safetensors").is_file()

    def seen(folder, rank):  # step -> batch sum; a resumed step's last line wins
        lines = (folder / f"rank{rank}.txt").read_text().split()
        return dict(zip(map(int, lines[::2]), lines[1::2]))

    for rank in (0, 1):
        clean, resumed = seen(logs["clean"], rank), seen(logs["killed"], rank)
        assert sorted(clean) == sorted(resumed) == list(range(20))
        assert clean == resumed, rank
        assert len(set(clean.values())) > 2  # the batches differ from step to step
    assert seen(logs["clean"], 0) != seen(logs["clean"], 1)  # each rank its own rows
    # pretrain.augment (on by default) changed the batches: no logged batch is a pair of stored
    # images as they are (the draws come from each step's generator, so the resume above agrees)
    from hfedit.data.prepared import load_split

    # (flips and circular shifts keep a batch's sum; the colour jitter changes it)
    sums = load_split(data, "rectifier").all().double().sum((1, 2, 3))
    plain = (sums[:, None] + sums[None, :]).flatten()
    logged = torch.tensor([float(v) for r in (0, 1) for v in seen(logs["clean"], r).values()],
                          dtype=torch.float64)
    assert (logged[:, None] - plain[None, :]).abs().min() > 1e-4


def test_a_checkpoint_copied_half_way_is_not_complete(tmp_path):
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    save_checkpoint(tmp_path / "a", "state", tensors, {"step": 3})
    assert checkpoint_complete(tmp_path / "a", "state")
    data = (tmp_path / "a" / "state.safetensors").read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "state.json").write_text((tmp_path / "a" / "state.json").read_text())
    (tmp_path / "b" / "state.safetensors").write_bytes(data[: len(data) // 2])  # copy cut short
    assert not checkpoint_complete(tmp_path / "b", "state")
    flipped = bytearray(data)
    flipped[-1] ^= 1  # same size, other bytes
    (tmp_path / "b" / "state.safetensors").write_bytes(bytes(flipped))
    assert not checkpoint_complete(tmp_path / "b", "state")
    assert not checkpoint_complete(tmp_path / "c", "state")


def test_every_run_starts_from_the_same_rectifier(random_denoiser):
    from hfedit.config import HfeditConfig, PretrainConfig
    from pipelines.pretrain_rectifier import initial_rectifier

    cfg = HfeditConfig(rectifier=SMALL)
    state = torch.random.get_rng_state()
    a = initial_rectifier(cfg, random_denoiser.unet).state_dict()
    torch.manual_seed(1234)  # whatever the process drew before
    b = initial_rectifier(cfg, random_denoiser.unet).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = initial_rectifier(HfeditConfig(rectifier=SMALL, pretrain=PretrainConfig(seed=1)),
                              random_denoiser.unet).state_dict()
    assert not torch.equal(a["head_b.0.weight"], other["head_b.0.weight"])
    torch.random.set_rng_state(state)


class _Shard:
    """The one method of a Ray Data shard that EpochRows uses, over fixed rows (the real shard
    is exercised by the Ray Train tests above); counts the passes."""

    def __init__(self, rows: list[bytes]):
        self.rows, self.passes = rows, 0

    def iter_batches(self, batch_size, batch_format):
        import numpy as np

        self.passes += 1
        for i in range(0, len(self.rows), batch_size):
            yield {"pixels": np.array(self.rows[i: i + batch_size], dtype=object)}


def test_small_splits_are_read_once_and_give_the_same_batches_as_streaming():
    from itertools import islice

    from pipelines.pretrain_rectifier import EpochRows, stream

    rows = [bytes([i]) * 12 for i in range(37)]  # 37 images of 2x2 RGB
    cached, streamed = _Shard(rows), _Shard(rows)
    a = list(islice(stream(cached, 4, 0, 1, 0, 37 // 4, 2, cache_bytes=1 << 20), 30))
    b = list(islice(stream(streamed, 4, 0, 1, 0, 37 // 4, 2, cache_bytes=100), 30))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 30
    assert cached.passes == 1 and streamed.passes == 4  # 30 batches = 3 epochs of 9 and a part
    big = EpochRows(_Shard(rows), cache_bytes=100)
    assert list(big) == rows and list(big) == rows
    assert big.kept is None and not big.fits and big.shard.passes == 2
    epochs = [torch.cat(a[i: i + 9]) for i in (0, 9)]
    assert not torch.equal(epochs[0], epochs[1])  # each epoch its own shuffle
    seen = [int(img[0, 0, 0].add(1).mul(127.5).round()) for batch in a[:9] for img in batch]
    assert len(set(seen)) == 36  # one epoch: 36 distinct images (the 37th dropped)
    resumed = list(islice(stream(_Shard(rows), 4, 0, 1, 11, 37 // 4, 2), 19))
    assert all(torch.equal(x, y) for x, y in zip(resumed, a[11:]))  # mid-epoch resume
