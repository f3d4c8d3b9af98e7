"""The cluster examples in docs/examples (issue 23): the cluster-launcher YAML passes Ray's own
schema and sets up what hfedit needs on every node, the KubeRay RayJob runs an edit_batch
command that edit_batch's own parser and URI check accept, with token auth and the store's
credentials in every container, and the Dockerfile installs the pinned environment. No cluster
is started: these are what a user copies."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from hfedit.storage import is_uri
from hfedit.validation import refuse_uris
from pipelines import edit_batch as eb

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
URI_FLAGS = ("--input", "--out", "--root", "--backbone", "--edits")


def _edit_batch_argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[:2] == ["python", "pipelines/edit_batch.py"], words[:2]
    return words[2:]


def _check_edit_batch_command(command: str) -> None:
    """What the job would do: accepted by edit_batch's parser and URI check, every location on
    the store (no node's own disk), one GPU per actor."""
    argv = _edit_batch_argv(command)
    refuse_uris(argv, "edit_batch", allowed=URI_FLAGS)
    args = eb.parse_args(argv)
    assert all(is_uri(v) for v in (args.input, args.out, args.backbone, args.edits)), argv
    assert args.num_gpus == 1 and args.no_track


def test_the_cluster_launcher_yaml_passes_rays_schema_and_sets_up_every_node():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((EXAMPLES / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a field Ray does not know or mistypes
    setup = " ".join(config["setup_commands"])
    assert "pip install -q -r requirements.lock" in setup and "--no-deps -e ." in setup
    assert config["file_mounts"]["~/hfedit"] == "." and "~/.ray/auth_token" in config["file_mounts"]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in c for c in starts)  # blocks joining
    for kind in ("head", "worker"):
        start = " ".join(config[f"{kind}_start_ray_commands"])
        assert "RAY_AUTH_MODE=token" in start and "~/hfedit/.venv/bin/ray start" in start, kind
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    # the header's job command is one edit_batch accepts
    header = [line[1:].strip() for line in (EXAMPLES / "cluster.yaml").read_text().splitlines()
              if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("ray job submit"))
    command = " ".join(line.rstrip("\\").strip() for line in header[start:start + 4])
    _check_edit_batch_command(command.split(" -- ", 1)[1])


def test_the_rayjob_runs_edit_batch_on_the_store_with_token_auth_in_every_container():
    job = yaml.safe_load((EXAMPLES / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _check_edit_batch_command(spec["entrypoint"])
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/opt/hfedit"}
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            for name in ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[name]["valueFrom"], name  # never a literal secret
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]
                                        ["limits"].get("nvidia.com/gpu", 0))
               for g in cluster["workerGroupSpecs"])
    actors = eb.parse_args(_edit_batch_argv(spec["entrypoint"])).actors
    assert actors <= gpus  # every actor gets its GPU


def test_the_dockerfile_installs_the_pinned_environment_at_the_rayjobs_working_dir():
    lines = (EXAMPLES / "Dockerfile").read_text().splitlines()
    import sys

    assert f"FROM python:{sys.version_info.major}.{sys.version_info.minor}-slim" in lines
    assert "WORKDIR /opt/hfedit" in lines
    assert "RUN pip install --no-cache-dir -r requirements.lock" in lines
