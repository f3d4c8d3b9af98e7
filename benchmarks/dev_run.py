"""The whole pipeline's wall time under each OpenMP wait policy: ``dvc repro --force`` in a
checkout, run once with ``OMP_WAIT_POLICY=PASSIVE`` (what ``./dev`` exports) and once with the
variable unset (OpenMP's default: a waiting thread spins before it sleeps), each stage timed from
DVC's "Running stage" lines.

    git clone <project> /tmp/bench && cd /tmp/bench && ./dev shell -c true
    .venv/bin/python benchmarks/dev_run.py --wipe --policy passive default

Each run starts from a fresh clone's state (``git clean -xfd``, keeping ``.venv`` and the logs:
the stages resume from checkpoints, prepared shards, done-logs and persisted edits, which a
second run would otherwise reuse) and rebuilds every stage (``--force``), with the same
environment ``./dev run`` sets otherwise. Each stage's seconds are appended to
``<logs>/<policy>.stages.jsonl`` as it ends, so a run cut short still gives its finished stages.
The runs are sequential, in the order given; what else the machine runs meanwhile is the "load"
of the figure. For the loaded one, ``--beside`` starts a command (the test suite in another
clone) at the start of each run and stops it when the run ends, so every policy's run has the
same load beside it from the same moment:

    git clone <project> /tmp/suite && (cd /tmp/suite && ./dev shell -c true)
    .venv/bin/python benchmarks/dev_run.py --wipe --until pretrain_rectifier \
        --beside 'cd /tmp/suite && ./dev test -v -p no:cacheprovider' --policy passive default

Prints a markdown table: the seconds of each stage per policy, and the total.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^Running stage '([^']+)'")


def dev_env(policy: str) -> dict[str, str]:
    """``./dev``'s environment with the wait policy replaced (``default``: unset)."""
    venv = ROOT / ".venv"
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), DVC_NO_ANALYTICS="1",
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def clean(keep: Path) -> None:
    """The checkout as a fresh clone has it: every ignored output removed but the environment
    and ``keep`` (the logs)."""
    keep_rel = os.path.relpath(keep.resolve(), ROOT)
    exclude = ["-e", ".venv"] + ([] if keep_rel.startswith("..") else ["-e", keep_rel])
    subprocess.run(["git", "clean", "-xfdq", *exclude], cwd=ROOT, check=True)


def run(policy: str, log: Path, first: str | None = None,
        last: str | None = None) -> dict[str, float]:
    """``dvc repro --force`` under ``policy`` (from stage ``first`` and downstream, or up to stage
    ``last`` and its upstream, when given); seconds per stage and in all (``total``)."""
    times: dict[str, float] = {}
    stages = log.with_suffix(".stages.jsonl")
    stages.write_text("")

    def ended(stage: str, seconds: float) -> None:
        times[stage] = seconds
        with open(stages, "a") as f:
            f.write(json.dumps({stage: seconds}) + "\n")

    start = time.perf_counter()
    current, since = None, start
    with open(log, "w") as out:
        command = ["dvc", "repro", "--force"] + (["--downstream", first] if first else
                                                  [last] if last else [])
        proc = subprocess.Popen(command, cwd=ROOT, env=dev_env(policy),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            out.flush()
            match = STAGE.match(line)
            if match:
                now = time.perf_counter()
                if current:
                    ended(current, now - since)
                current, since = match.group(1), now
        if proc.wait() != 0:
            raise SystemExit(f"dvc repro under OMP_WAIT_POLICY={policy} failed: see {log}")
    end = time.perf_counter()
    if current:
        ended(current, end - since)
    ended("total", end - start)
    return times


def session(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux: read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def beside(command: str | None, log: Path):
    """``command`` running in its own session (its output in ``log``) while the block runs; then
    every process of its session is stopped: SIGTERM, SIGKILL after 10 s (a process that
    starts a session of its own outlives it). Yields the number of pytest test
    results (``PASSED``, ``FAILED``...) its output holds at the end, in a dict, or nothing."""
    if not command:
        yield {}
        return
    done: dict[str, int] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, shell=True, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield done
        finally:
            text = log.read_text(errors="replace")
            done["tests_done"] = len(re.findall(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL)", text))
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in session(proc.pid):  # its Ray clusters too, in their own groups
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", nargs="+", choices=["passive", "default", "active"],
                    default=["passive", "default"])
    ap.add_argument("--logs", type=Path, default=ROOT / "benchmarks-dev-run",
                    help="folder for each run's dvc output")
    ap.add_argument("--wipe", action="store_true",
                    help="required: every ignored file of this checkout (models, data, outputs, "
                    "mlflow.db) but .venv and the logs is deleted before each run; use a clone "
                    "made for the benchmark")
    ap.add_argument("--from", dest="first", metavar="STAGE",
                    help="finish a run cut short: no cleaning, `dvc repro --force --downstream "
                    "STAGE` (the stages before it as the cut run left them; its own outputs must "
                    "not hold partial work: an interrupted train_edits leaves no edit, edit_batch "
                    "leaves finished images)")
    ap.add_argument("--until", metavar="STAGE",
                    help="run the pipeline up to STAGE only (`dvc repro --force STAGE`): the "
                    "stages that dominate the run, when a whole run under load does not fit")
    ap.add_argument("--beside", metavar="COMMAND",
                    help="a shell command run beside each run, from its start to its end (the "
                    "load of the figure), its output in <logs>/<policy>.beside.log")
    args = ap.parse_args()
    if args.first and (args.until or len(args.policy) > 1):
        ap.error("--from finishes one cut run: one --policy, no --until")
    if not args.wipe and not args.first:
        ap.error("--wipe is required: each run deletes this checkout's outputs (models, data, "
                 "mlflow.db); run it in a clone made for it")
    args.logs.mkdir(parents=True, exist_ok=True)
    results = {}
    for policy in args.policy:
        name = f"{policy}.from-{args.first}" if args.first else policy
        if not args.first:  # --from keeps what the cut run left
            clean(args.logs)
        print(f"[dev_run] dvc repro --force, OMP_WAIT_POLICY={policy}", file=sys.stderr, flush=True)
        with beside(args.beside, args.logs / f"{name}.beside.log") as load:
            results[policy] = run(policy, args.logs / f"{name}.log", args.first, args.until)
        print(json.dumps({policy: results[policy], **load}), file=sys.stderr, flush=True)
    stages = [s for s in results[args.policy[0]] if s != "total"]
    stages += [s for p in args.policy for s in results[p] if s not in stages and s != "total"]
    print("| stage | " + " | ".join(f"`OMP_WAIT_POLICY` {p} (s)" for p in args.policy) + " |")
    print("|---|" + "---|" * len(args.policy))
    for stage in stages + ["total"]:
        cells = [f"{results[p][stage]:.0f}" if stage in results[p] else "-" for p in args.policy]
        name = "**whole run**" if stage == "total" else f"`{stage}`"
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
