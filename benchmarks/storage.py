"""edit_batch throughput and peak memory: a local folder vs an S3-compatible server, same images.

    .venv/bin/python benchmarks/storage.py [--n 32] [--steps 20] [--repeats 2] [--backbone models/backbone]

The same N real images (scikit-image's LFW faces and astronaut, as PNG files), the same job
(reconstruction, batch 4, 1 torch thread, the plain loop of ``run_job``: no Ray, so only the
storage differs), each run in a fresh process writing to a fresh place:

  local   --input <folder> --out <folder>, models in a local folder
  s3      --input s3://bench/in --out s3://bench/out-<k>, the backbone on the bucket too (fetched
          into a fresh HFEDIT_CACHE each run), against moto's S3 server on 127.0.0.1

Wall time is end to end (listing and the inputs' digests, model loading, every image, the
manifest, the done-log's compaction). Peak memory is the run's process's ``ru_maxrss``. Modes
are interleaved and the best of ``--repeats`` kept; the load average is printed. moto is a
Python server on the same cores: a real S3 endpoint adds network latency instead (each image
costs one GET, one PUT per output and one small PUT for its done-log entry).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BUCKET = "bench"


def _run(args: tuple) -> tuple[float, int, float, float]:
    """One fresh process: (wall s, images edited, work s, peak RSS MB)."""
    source, out, backbone, steps, batch, env = args
    os.environ.update(env)
    import resource

    import torch

    torch.set_num_threads(1)
    from edit_batch import _config, busy_seconds
    from pipelines.edit_batch import execute_plain, run_job

    start = time.perf_counter()
    result = run_job(_config(steps, 1, batch), source, out, backbone, progress=False,
                     executor=execute_plain)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return wall, result.counts["edited_now"], busy_seconds(result.manifest), rss


def _start_s3(folder: Path) -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    log = open(folder / "moto.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                 aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return proc, env


def main() -> None:
    from edit_batch import bench_backbone, parse_args, write_images

    args = parse_args(__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="stbench"))
    backbone = bench_backbone(args.backbone, work, args.steps)
    write_images(work / "images", args.n)
    server, env = _start_s3(work)
    os.environ.update(env)
    from hfedit.storage import copy_tree

    copy_tree(work / "images", f"s3://{BUCKET}/in")
    copy_tree(backbone, f"s3://{BUCKET}/backbone")
    best: dict[str, tuple[float, float, float]] = {}  # mode -> (wall, work, rss)
    loads = []
    try:
        for rep in range(args.repeats):
            for mode in ("local", "s3"):
                run_env = {**env, "HFEDIT_CACHE": str(work / f"cache-{mode}{rep}")}
                job = ((str(work / "images"), str(work / f"out-{rep}"), backbone) if mode == "local"
                       else (f"s3://{BUCKET}/in", f"s3://{BUCKET}/out-{rep}", f"s3://{BUCKET}/backbone"))
                loads.append(os.getloadavg()[0])
                with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                    wall, done, busy, rss = pool.submit(
                        _run, (*job, args.steps, args.batch, run_env)).result()
                assert done == args.n, (mode, done)
                old = best.get(mode, (float("inf"), 0.0, 0.0))
                best[mode] = min(old, (wall, busy, max(rss, old[2])))
                print(f"  repeat {rep + 1}: {mode}: {wall:.1f} s, {rss:.0f} MB", flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.n} images, {args.steps} inversion steps (+{args.steps} replay), reconstruction, "
          f"batch {args.batch}, plain loop, 1 torch thread, {os.cpu_count()} CPUs, load average "
          f"{min(loads):.1f}-{max(loads):.1f}, best of {args.repeats}")
    print(f"{'storage':<8}{'wall s':>9}{'images/s':>10}{'vs local':>10}{'work s/img':>12}"
          f"{'not work s':>12}{'peak MB':>9}")
    local_ips = args.n / best["local"][0]
    for mode in ("local", "s3"):
        wall, busy, rss = best[mode]
        ips = args.n / wall
        vs = f"{(ips / local_ips - 1) * 100:+.1f}%" if mode == "s3" else ""
        print(f"{mode:<8}{wall:>9.1f}{ips:>10.2f}{vs:>10}{busy / args.n:>12.3f}{wall - busy:>12.1f}"
              f"{rss:>9.0f}")
    print("work s/img: time inside decode, model and write per image; not work s: wall - work "
          "(listing and digests, model loading, manifest, log compaction)")


if __name__ == "__main__":
    main()
