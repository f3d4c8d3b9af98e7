"""Batch editing as a user runs it: pipelines/edit_batch.py as a process interrupted by a signal
and finished by a rerun, and `ray job submit` exactly as the README writes it, against a real
head node."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines import edit_batch as eb
from tests.servers import stop_cluster
from tests.test_data import folder  # noqa: F401 - real faces, odd modes, broken files, bad links
from tests.test_edit_batch import ATTRS, ROOT, STEPS, _scanned, models  # noqa: F401


# ------------------------------------------------------------------- as a user runs it
def _env(tmp_path: Path) -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "HFEDIT_ROOT": str(ROOT),
            "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}


def _cli_args(root, out, backbone, edits, *extra) -> list[str]:
    return ["--input", str(root), "--out", str(out), "--backbone", str(backbone), "--edits", str(edits),
            "--attributes", *ATTRS, "--steps", str(STEPS), "--no-progress", *extra]


def _ok_lines(out: Path) -> int:
    logs = list((out / eb.LOG_DIR).glob("*.jsonl")) if (out / eb.LOG_DIR).exists() else []
    return sum(p.read_text().count('"status": "ok"') for p in logs)


def _interrupted(cmd: list[str], out: Path, tmp_path: Path, sig: signal.Signals):
    """Run ``cmd``, send ``sig`` once it has edited 2 more images (4 more done-log rows), and
    return the manifest it wrote and the rows it finished."""
    before = _ok_lines(out)
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if _ok_lines(out) >= before + 4:  # 2 images x 2 attributes
            proc.send_signal(sig)
            break
        time.sleep(0.1)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, log[-3000:]  # 130 Ctrl-C, 143 SIGTERM
    assert f"stopped: interrupted ({sig.name})" in log  # the summary line
    manifest = eb.read_manifest(out)
    assert (manifest.reason == eb.NOT_PROCESSED).any(), "interrupted too late to test anything"
    return manifest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_jobs_interrupted_by_sigint_then_sigterm_are_finished_by_a_rerun(
        folder, models, tmp_path):  # noqa: F811
    """Ctrl-C (SIGINT) and `ray job stop`/`kill` (SIGTERM) stop a job with exit 130/143 after
    writing the manifest of what was done; the next run picks up where the last stopped, and
    the last one finishes without redoing anything."""
    root, expected = _scanned(folder)
    backbone, edits = models
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "pipelines/edit_batch.py"),
           *_cli_args(root, out, backbone, edits, "--actors", "1", "--batch-size", "2",
                      "--steps", "20", "--no-track")]
    done: dict[tuple[str, str], str] = {}  # (id, attribute) -> run, of rows finished so far
    for sig in (signal.SIGINT, signal.SIGTERM):
        manifest = _interrupted(cmd, out, tmp_path, sig)
        ok = manifest[manifest.status == "ok"]
        assert {k: done[k] for k in done} == {k: r for k, r in zip(zip(ok.id, ok.attribute), ok.run)
                                             if k in done}  # kept from the run before
        done = dict(zip(zip(ok.id, ok.attribute), ok.run))
    assert len(set(done.values())) == 2  # both interrupted runs finished some images
    mtimes = {o: (out / o).stat().st_mtime_ns for o in ok.output}

    proc = subprocess.run([*cmd[:-1]], env=_env(tmp_path), cwd=ROOT, capture_output=True,
                          text=True, timeout=240)  # the same command (tracked in MLflow)
    assert proc.returncode == eb.EXIT_FAILED, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = eb.read_manifest(out)
    n_ok = sum(v == "ok" for v in expected.values())
    assert (last[last.status == "ok"].groupby("id").size() == len(ATTRS)).sum() == n_ok
    assert not (last.reason == eb.NOT_PROCESSED).any()
    # nothing done twice: what the interrupted runs finished kept its PNG and its row
    assert {o: (out / o).stat().st_mtime_ns for o in mtimes} == mtimes
    rows = dict(zip(zip(last.id, last.attribute), last.run))
    assert {k: rows[k] for k in done} == done
    assert f"{n_ok} edited" in proc.stdout and "failed" in proc.stdout


README_FOLDERS = "BUCKET=s3://my-bucket/hfedit MODELS=$PWD/models PHOTOS=$PWD/photos"
README_HEAD = "HEAD_IP=$(hostname -I | awk '{print $1}')"
README_PORTS = "PORT=6379 DASH=8265 AGENT=52365"
README_STOP = "kill $WORKER $HEAD"
README_JOIN = "RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) ray start"


def _readme_cluster_commands() -> str:
    """Step 2 of the README's batch-editing block, as written."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("# 2. on a cluster"):text.index("# 3. as the DVC stage")]
    for line in (README_FOLDERS, README_HEAD, README_PORTS, README_STOP, README_JOIN):
        assert line in block, f"the README's step 2 no longer has {line!r}: update this test"
    return block


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_exactly_as_the_readme_writes_it(folder, models, tmp_path):  # noqa: F811
    """The README's step 2 with its bucket, folders, head address and ports pointed at the
    test's (a moto S3 server, 127.0.0.1, free ports), both nodes on this machine: token
    authentication on (a client with another token is refused), the models and photos copied
    up, the job's outputs, manifest and done-log on the bucket, a non-image file ignored,
    outputs without double extensions, nothing written to a local ./s3: folder."""
    from hfedit.storage import Location
    from tests.servers import S3_BUCKET, free_port, s3_server

    root, _ = folder
    backbone, edits = models
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("astronaut.jpg", "astronaut.png", "lfw_0.png"):
        shutil.copy(root / "faces" / name, photos / name)
    shutil.copy(root / "faces/lfw_1.png", photos / "sub" / "lfw_1.png")
    (photos / "readme.txt").write_text("faces from scikit-image\n")
    bucket = f"s3://{S3_BUCKET}/readme"
    script = (_readme_cluster_commands()
              .replace(README_FOLDERS, f"BUCKET={bucket} MODELS={backbone.parent} PHOTOS={photos}")
              .replace(README_HEAD, "HEAD_IP=127.0.0.1")
              .replace(README_PORTS, f"PORT={free_port()} DASH={free_port()} AGENT={free_port()}")
              .replace(README_STOP, "! RAY_AUTH_TOKEN=not-the-token ray job list --address "
                       "http://$HEAD_IP:$DASH > /dev/null 2>&1\n" + README_STOP))
    temp = tempfile.mkdtemp(prefix="rayrd", dir="/tmp")  # this cluster's own Ray temp dir
    # the worker node as another machine: its own Ray temp dir (where it unpacks the job's
    # working directory and keeps its logs; stopped by that dir's processes) and model cache
    temp2 = tempfile.mkdtemp(prefix="rayrw", dir="/tmp")
    script = script.replace(README_JOIN, f"RAY_TMPDIR={temp2} HFEDIT_CACHE={tmp_path}/worker-cache "
                            f"{README_JOIN}")
    env = {k: v for k, v in _env(tmp_path).items()
           if k not in ("HFEDIT_ROOT", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}  # the project's environment
    env.update(RAY_TMPDIR=temp, HOME=str(tmp_path / "home"))  # the token under this HOME
    with s3_server(tmp_path) as store:
        try:
            prelude = "trap 'kill $WORKER $HEAD 2> /dev/null || true' EXIT\nset -e\n"
            proc = subprocess.run(["bash", "-c", prelude + script], cwd=ROOT, env={**env, **store},
                                  capture_output=True, text=True, timeout=800)
            log = proc.stdout + proc.stderr
            assert proc.returncode == 0, log[-12000:]
            assert "succeeded" in log.lower() and "1 other files ignored" in log, log[-3000:]
        finally:
            stop_cluster(temp)  # only this cluster
            stop_cluster(temp2)
        os.environ.update(store)
        try:
            result = eb.read_manifest(f"{bucket}/outputs/photos")
            objects = Location(f"{bucket}/outputs/photos").files()
        finally:
            for key in store:
                os.environ.pop(key, None)
    assert (tmp_path / "home/.ray/auth_token").is_file()
    ids = ["astronaut.jpg", "astronaut.png", "lfw_0.png", "sub/lfw_1.png"]
    assert sorted(set(result.id)) == ids and (result.status == "ok").all()
    outputs = set(result.output)
    for a in ATTRS:
        assert {f"{a}/astronaut.png", f"{a}/astronaut.jpg.png", f"{a}/lfw_0.png",
                f"{a}/sub/lfw_1.png"} <= outputs
    assert outputs <= set(objects) and "_log/0-compacted.jsonl" in objects
    # one actor of 1.5 CPUs per 2-CPU node: one started on each, and each fetched the models
    # into its own node's cache (the head's: ~/.cache/hfedit)
    for cache in (tmp_path / "home/.cache/hfedit", tmp_path / "worker-cache"):  # head, worker
        assert len(list((cache / "store").glob("*/unet"))) == 1, cache
    assert not (ROOT / "s3:").exists()
