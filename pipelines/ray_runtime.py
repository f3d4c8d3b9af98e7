"""Joining or starting Ray the same way from every entry point.

``runtime.ray.address`` "" starts a local Ray (or joins ``RAY_ADDRESS`` when set, which is what
``ray job submit`` does for the driver); "auto" or "host:port" joins a running cluster.
Local clusters bind 127.0.0.1 only and have no token auth (see DESIGN.md's pitfalls).
"""

from __future__ import annotations

import os

from hfedit.config import HfeditConfig, project_root
from hfedit.device import wants_gpu


def init_ray(cfg: HfeditConfig, num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.runtime.ray.address or os.environ.get("RAY_ADDRESS") or None
    # Workers import hfedit/pipelines from the project even when started from elsewhere.
    runtime_env = {"env_vars": {"HFEDIT_ROOT": str(project_root()),
                                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env,
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    else:
        ray.init(address=address, runtime_env=runtime_env)
    return ray


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def task_placement(cfg: HfeditConfig) -> tuple[str, float]:
    """``(device, GPUs to ask for)`` of a Ray task or actor under ``runtime.device``: ``auto``
    puts it on a GPU when the cluster has one (``runtime.ray.edit_task_gpus`` of it), ``cuda``
    requires one, ``cpu`` never asks. The task resolves the device it is given (inside a task,
    ``cuda`` is the GPU Ray assigned it)."""
    gpu = wants_gpu(cfg.runtime.device, cluster_gpus())
    return ("cuda" if gpu else "cpu"), (cfg.runtime.ray.edit_task_gpus if gpu else 0.0)


def actor_gpus(cfg: HfeditConfig) -> float:
    """GPUs per Ray Data model actor of edit_batch under ``runtime.device``: none for ``cpu``
    (or ``auto`` on a cluster without GPUs); ``edit_batch.num_gpus`` when set; else the
    cluster's GPUs shared by the ``edit_batch.actors`` actors (at most one each)."""
    gpus = cluster_gpus()
    if not wants_gpu(cfg.runtime.device, gpus):
        return 0.0
    eb = cfg.edit_batch
    return eb.num_gpus if eb.num_gpus > 0 else min(1.0, gpus / max(1, eb.actors))
