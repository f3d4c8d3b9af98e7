"""Real servers the end-to-end tests start on 127.0.0.1: a free port, and waiting until one
answers (failing with the end of its log when it dies or never does)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits or ``timeout`` s pass."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def stop(proc, timeout: float = 30) -> None:
    """End a server a test started (its PID): SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_cluster(temp: str) -> None:
    """Kill the processes of a Ray cluster a test started with its own temp dir (every one
    names that dir on its command line; nobody else's) and remove the dir."""
    import os
    import shutil
    import signal
    from pathlib import Path

    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if temp.encode() in cmdline and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(temp, ignore_errors=True)


S3_BUCKET = "hfedit-test"


@contextlib.contextmanager
def s3_server(folder: Path):
    """An S3-compatible server (moto, the one s3fs's own suite uses) on a free loopback port,
    with the bucket :data:`S3_BUCKET`; yields the environment a client needs
    (``AWS_ENDPOINT_URL``, test credentials), stopped by its PID after."""
    import os
    import sys

    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}
    log = folder / "moto.log"
    server = Path(sys.executable).parent / "moto_server"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc, log, timeout=60)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1"
                     ).create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        stop(proc)
