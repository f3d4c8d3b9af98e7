"""Two real Ray nodes on this machine: a head started with ``ray start --head`` and a second node
joined with ``ray start --address``, both under the project's own environment (as ``./dev``
sets it), each with its own CPUs. An edit_batch job on that cluster spreads its model actors over
both nodes and keeps its decode and write tasks on the driver's node, whose disk holds
``--input`` and ``--out``: with writers on the other node, a cluster of nodes with their own
disks had PNGs on that node's disk while the job counted them done.

The nodes share this machine's disk, so a misplaced write would still be visible here: the test
reads where each PNG was written from the done-log (``written_on``, the writer's Ray node)."""

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
