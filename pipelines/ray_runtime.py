"""Joining or starting Ray the same way from every entry point.

``runtime.ray.address`` "" starts a private local Ray (or joins ``RAY_ADDRESS`` when set, which is
what ``ray job submit`` does for the driver); "auto" or "host:port" joins a running cluster.
Private means ``address="local"``: Ray's default (no address) would join whatever cluster
``ray start --head`` last left in ``<RAY_TMPDIR>/ray/ray_current_cluster``, and retry it forever
once that cluster is gone. Local clusters bind 127.0.0.1 only and have no token auth (see
DESIGN.md's pitfalls).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hfedit.config import HfeditConfig, project_root
from hfedit.device import wants_gpu

log = logging.getLogger("hfedit.ray")
# Ray 2.60 waits a fixed 30 s for its raylet to register (ray/_private/node.py,
# raylet_start_wait_time_s; no setting changes it): on a loaded machine that can run out, so a
# local start is retried once. Workers get longer to register than the default 60 s.
STARTUP_TIMEOUT = "timed out during startup"
WORKER_REGISTER_TIMEOUT_S = "180"


def start_local_ray(num_cpus: int | None = None, **init_kwargs):
    """Start a private Ray on this machine (127.0.0.1) and connect to it; never join another.

    When the node times out during startup (a loaded machine), the processes that attempt
    started are killed and the start is tried once more."""
    import psutil
    import ray

    # binds --node-ip-address 127.0.0.1 as given (else Ray takes the machine's address); only
    # for this private local cluster: set for a process that joins a cluster, Ray refuses it
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_register_timeout_seconds", WORKER_REGISTER_TIMEOUT_S)
    init_kwargs.setdefault("_node_ip_address", "127.0.0.1")
    for attempt in (1, 2):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            return ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
        except Exception as err:
            if attempt == 2 or STARTUP_TIMEOUT not in str(err):
                raise
            log.warning("Ray did not start in time (%s); stopping what it started and retrying "
                        "once", str(err).splitlines()[0])
            ray.shutdown()
            for proc in psutil.Process().children(recursive=True):
                if proc.pid not in before:
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass


def init_ray(cfg: HfeditConfig, num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.runtime.ray.address or os.environ.get("RAY_ADDRESS") or None
    from pipelines.tracking import uploaded_copy

    if address is not None and uploaded_copy(Path.cwd()):
        # under `ray job submit --working-dir`: every worker runs in its own node's copy of the
        # working directory (the job's runtime env), where project_root() finds params.yaml;
        # HFEDIT_ROOT would name the driver node's copy, a path other nodes do not have
        ray.init(address=address)
        return ray
    # Workers import hfedit/pipelines from the project even when started from elsewhere.
    runtime_env = {"env_vars": {"HFEDIT_ROOT": str(project_root()),
                                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
    if address is None:
        start_local_ray(num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                        runtime_env=runtime_env, log_to_driver=True)
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


def split_dataset(data, split: str, num_cpus: float = 0.0, groups_per_task: int = 4,
                  read_tasks: int = 2):
    """A split of a prepared dataset (:class:`hfedit.data.prepared.PreparedData`) as a Ray Data
    dataset of ``pixels`` rows (R*R*3 uint8 bytes each), in the split's order; convert per batch
    with :func:`hfedit.data.images.pixels_to_tensor`.

    The input is one row per Parquet row group holding rows of the split (from the index: no
    listing); at most ``read_tasks`` tasks of ``num_cpus`` each read ``groups_per_task`` groups
    at a time (:func:`hfedit.data.parquet.read_groups`: they import pyarrow, not torch). Not
    ``ray.data.read_parquet``: its first step (listing the files, or sampling them in its older
    path) is a task that asks for a whole CPU whatever the read asks, and while Ray Train's
    workers hold every CPU (2 workers x 1 CPU on a 2-CPU node) it never starts: measured here,
    pretraining waited until Ray's health check killed the workers. Reading only moves Parquet
    pages, so by default it asks for no CPU.
    """
    import ray.data

    from hfedit.data.parquet import read_groups

    # the shards by path or URI: each task opens them with the filesystem the URI names (a
    # filesystem object sent along would carry this process's credentials to every worker)
    ds = ray.data.from_items(data.row_groups(split)).map_batches(
        read_groups, batch_size=groups_per_task, batch_format="numpy", num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=read_tasks),
        fn_kwargs={"files": data.shard_uris()})
    ds.context.execution_options.preserve_order = True  # the split's order, every run
    return ds
