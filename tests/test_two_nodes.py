"""Two real Ray nodes on this machine: a head started with ``ray start --head`` and a second node
joined with ``ray start --address``, both under the project's own environment (as ``./dev``
sets it), each with its own CPUs. An edit_batch job on that cluster spreads its model actors over
both nodes and keeps its decode and write tasks on the driver's node, whose disk holds
``--input`` and ``--out``: with writers on the other node, a cluster of nodes with their own
disks had PNGs on that node's disk while the job counted them done.

The nodes share this machine's disk, so a misplaced write would still be visible here: the test
reads where each PNG was written from the done-log (``written_on``, the writer's Ray node).

The second test is the cluster of nodes with their own disks: the second node joins with its own
Ray temp dir, working directory and model cache, and pretraining then edit training run on it
with everything on an S3 server (moto on 127.0.0.1): the backbone, the data, the checkpoints and
the rectifier, then the edit rectifiers. Where each piece of work ran is read back from Ray's
state API: the training workers and the edit tasks ran on both nodes. (A batch job bucket to
bucket on two such nodes is the README's cluster recipe, tests/test_edit_batch_as_user.py.)"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import pytest

from pipelines import edit_batch as eb
from pipelines.batch_job import DoneIndex
from tests.servers import free_port, stop_cluster
from tests.test_data import folder  # noqa: F401 - real faces
from tests.test_edit_batch import _cfg, models  # noqa: F401 - tiny backbone + rectifier

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _ray(args: list[str], env: dict, temp: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=2",
                           "--disable-usage-stats", f"--temp-dir={temp}"],
                          env=env, capture_output=True, text=True, timeout=240)


def test_edit_batch_on_two_nodes_writes_every_output_on_the_drivers_node(
        folder, models, tmp_path, monkeypatch):  # noqa: F811
    import ray

    root, expected = folder
    backbone, edits = models
    # the project's environment: ./dev exports neither this nor a Ray address (a process that
    # has it set cannot join a cluster); start_local_ray sets it in this process for its own
    # private clusters, so it is removed here
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")  # this cluster's own temp dir
    port = free_port()
    ray.shutdown()
    try:
        head = _ray(["--head", f"--port={port}", "--include-dashboard=false"], env, temp)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        second = _ray([f"--address=127.0.0.1:{port}"], env, temp)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(1)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        driver = ray.get_runtime_context().get_node_id()
        # 1.5 CPUs per actor on 2-CPU nodes: one actor per node, 0.5 CPU left for the tasks
        cfg = _cfg(edits, "edit_batch.actors=2", "edit_batch.batch_size=2",
                   "edit_batch.num_cpus=1.5")
        out = tmp_path / "out"
        result = eb.run_job(cfg, root, out, str(backbone), progress=False)
    finally:
        ray.shutdown()
        stop_cluster(temp)  # only this cluster
    n_ok = sum(v == "ok" for v in expected.values())
    ok = result.manifest[result.manifest.status == "ok"]
    assert ok.id.nunique() == n_ok and len(ok) == n_ok * 2
    rows = [r for r in DoneIndex(out).refresh().rows.values() if r.get("status") == "ok"]
    assert len(rows) == len(ok)
    assert {r["written_on"] for r in rows} == {driver}  # every PNG on the driver's disk
    assert {r["worker_node"] for r in rows} == nodes  # edited on both nodes
    for r in rows:
        assert (out / r["output"]).stat().st_size == r["out_bytes"]


def _stage(script: str, env: dict, cwd, *args: str) -> subprocess.CompletedProcess:
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "pipelines" / script), *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=400)


def test_pretraining_and_edit_training_on_two_nodes_with_everything_on_a_store(
        random_denoiser, tmp_path, monkeypatch):
    import json

    from ray.util.state import list_actors, list_nodes, list_tasks

    from hfedit.models.backbone import save_backbone
    from hfedit.storage import Location, copy_tree
    from tests.conftest import prepared_faces
    from tests.servers import S3_BUCKET, s3_server

    save_backbone(random_denoiser, tmp_path / "backbone")
    prepared_faces(tmp_path / "data", 12, val_fraction=1 / 3)  # 8 train, 4 val
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bucket = f"s3://{S3_BUCKET}/cluster"
    temp = tempfile.mkdtemp(prefix="ray2s", dir="/tmp")  # the head's Ray temp dir
    temp2 = tempfile.mkdtemp(prefix="ray2w", dir="/tmp")  # the second node's, as another machine
    port, dash = free_port(), free_port()
    (tmp_path / "node2").mkdir()
    with s3_server(tmp_path) as store:
        for key, value in store.items():
            monkeypatch.setenv(key, value)
        for name in ("backbone", "data"):
            copy_tree(tmp_path / name, f"{bucket}/{name}")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "HF_HUB_OFFLINE": "1"}
        try:
            head = subprocess.run(
                ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                 "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp}"],
                env={**env, "HFEDIT_CACHE": str(tmp_path / "head-cache")},
                capture_output=True, text=True, timeout=240)
            assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
            second = subprocess.run(
                ["ray", "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                 "--num-cpus=2", "--disable-usage-stats"], cwd=tmp_path / "node2",
                env={**env, "RAY_TMPDIR": temp2, "HFEDIT_CACHE": str(tmp_path / "node2-cache")},
                capture_output=True, text=True, timeout=240)
            assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
            driver = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}",
                      "HFEDIT_CACHE": str(tmp_path / "driver-cache"),
                      "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
            # one training worker and one edit task of 1.5 CPUs fit a 2-CPU node: one per node
            sets = ["rectifier.trunk=resnet18", "rectifier.branch_channels=16",
                    "rectifier.time_embed_dim=32", "pretrain.steps=4", "pretrain.batch_size=2",
                    "pretrain.checkpoint_every=2", "pretrain.eval_steps=5",
                    "pretrain.eval_images=2", "runtime.ray.num_workers=2",
                    "runtime.ray.cpus_per_worker=1.5", "runtime.ray.edit_task_cpus=1.5",
                    "runtime.ray.max_failures=0", "edits.share_trunk=false",
                    *[f"edits.attributes.{a}.{k}={v}" for a in ("smiling", "old")
                      for k, v in (("steps", 2), ("batch_size", 2), ("num_images", 4))]]
            sets = [a for s in sets for a in ("--set", s)]
            pre = _stage("pretrain_rectifier.py", driver, tmp_path, "--backbone",
                         f"{bucket}/backbone", "--data", f"{bucket}/data", "--checkpoints",
                         f"{bucket}/ckpt", "--out", f"{bucket}/rectifier", "--metrics",
                         str(tmp_path / "pretrain.json"), *sets)
            assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-5000:]
            edits = _stage("train_edits.py", driver, tmp_path, "--backbone", f"{bucket}/backbone",
                           "--rectifier", f"{bucket}/rectifier", "--data", f"{bucket}/data",
                           "--out", f"{bucket}/edits", "--metrics", str(tmp_path / "edits.json"),
                           *sets)
            assert edits.returncode == 0, edits.stdout[-3000:] + edits.stderr[-5000:]
            address = f"127.0.0.1:{port}"
            nodes = {n.node_id for n in list_nodes(address=address)}
            workers = [a for a in list_actors(address=address, detail=True, limit=10_000)
                       if "TrainWorker" in a.class_name]
            tasks = [t for t in list_tasks(address=address, detail=True, limit=10_000)
                     if t.name.startswith("train_edits:")]
        finally:
            stop_cluster(temp)  # only this cluster
            stop_cluster(temp2)
        objects = Location(bucket).files()
        status = json.loads(Location(bucket).read_bytes("edits/status.json"))
    assert len(nodes) == 2
    assert {a.node_id for a in workers} == nodes, [(a.class_name, a.node_id) for a in workers]
    assert {t.name for t in tasks} == {"train_edits:smiling", "train_edits:old"}
    assert {t.node_id for t in tasks} == nodes, [(t.name, t.node_id) for t in tasks]
    # every output on the store: the checkpoints, the rectifier, the edit rectifiers, status
    assert any(r.startswith("ckpt/") and r.endswith("train_state.json") for r in objects)
    for rel in ("rectifier/rectifier.json", "rectifier/rectifier.safetensors", "edits/status.json",
                "edits/smiling/rectifier.json", "edits/old/rectifier.safetensors"):
        assert rel in objects, sorted(objects)
    assert {a: v["status"] for a, v in status.items()} == {"smiling": "trained", "old": "trained"}
    # each node fetched the models into its own cache (the second node's: node2-cache)
    assert len(list((tmp_path / "node2-cache/store").glob("*/unet"))) == 1
    assert not list(tmp_path.glob("s3:*")) and not (tmp_path / "rectifier").exists()
