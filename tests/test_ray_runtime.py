"""Starting Ray (pipelines/ray_runtime.py): a private cluster is private, an address the user
gives is honoured, and a start that times out on a loaded machine is retried once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hfedit.config import load_config
from pipelines import ray_runtime

ROOT = Path(__file__).resolve().parents[1]


class FakeRay:
    """Records ray.init calls; raises the given errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.calls: list[dict] = []
        self.errors = list(errors)
        self.shutdowns = 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)
        return "context"

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def fake_ray(monkeypatch):
    def install(*errors: Exception) -> FakeRay:
        fake = FakeRay(*errors)
        monkeypatch.setitem(sys.modules, "ray", fake)
        return fake

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return install


def test_a_local_run_starts_a_private_cluster_never_joins_one(fake_ray):
    """Without address="local", ray.init joins the cluster `ray start --head` last recorded."""
    ray = fake_ray()
    ray_runtime.init_ray(load_config())
    assert [c["address"] for c in ray.calls] == ["local"]
    assert ray.calls[0]["_node_ip_address"] == "127.0.0.1"


@pytest.mark.parametrize("where", ["RAY_ADDRESS", "runtime.ray.address"])
def test_an_address_the_user_gives_is_joined(fake_ray, monkeypatch, where):
    ray = fake_ray()
    if where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
        cfg = load_config()
    else:
        cfg = load_config(overrides=["runtime.ray.address=127.0.0.1:6390"])
    ray_runtime.init_ray(cfg)
    assert [c["address"] for c in ray.calls] == ["127.0.0.1:6390"]


def test_a_start_that_times_out_under_load_is_retried_once(fake_ray):
    timeout = Exception("The current node timed out during startup. This could happen ...")
    ray = fake_ray(timeout)
    assert ray_runtime.start_local_ray(2) == "context"
    assert len(ray.calls) == 2 and ray.shutdowns == 1
    ray = fake_ray(timeout, timeout)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_runtime.start_local_ray(2)
    assert len(ray.calls) == 2  # once more, not forever
    ray = fake_ray(ValueError("bad argument"))
    with pytest.raises(ValueError):
        ray_runtime.start_local_ray(2)
    assert len(ray.calls) == 1  # other errors are not retried


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dead_cluster_left_by_ray_start_is_not_retried():
    """`ray start --head` records its GCS in <RAY_TMPDIR>/ray/ray_current_cluster; after that
    cluster is killed, a local run used to retry the dead address until it was killed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    tmp = Path(tempfile.mkdtemp(prefix="rayrt", dir="/tmp"))  # short: Unix socket paths
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(tmp), "HFEDIT_ROOT": str(ROOT), "PYTHONPATH": str(ROOT),
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    code = ("from hfedit.config import load_config; from pipelines.ray_runtime import init_ray; "
            "ray = init_ray(load_config(), num_cpus=1); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=240)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gcs = proc.stdout.split("GCS ")[1].split()[0]
    assert gcs != dead and gcs.startswith("127.0.0.1:")
