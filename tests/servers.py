"""Real servers the end-to-end tests start on 127.0.0.1: a free port, and waiting until one
answers (failing with the end of its log when it dies or never does)."""

from __future__ import annotations

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
