"""Memory and speed of the data path as the number of images grows (prepare, pretraining input,
edit-training reads), at 256 px.

    .venv/bin/python benchmarks/data_scale.py [--sizes 1000 4000 16000] [--work /tmp/hfedit-data-scale]

For each size N it builds (once, then reuses) a folder of N synthetic 256 px JPEGs: random
crops, flips and colour jitter of the photographs that ship in scikit-image and matplotlib
(astronaut, coffee, chelsea, Grace Hopper), generated here, never committed. Then, each in its
own process, sampling every 0.1 s the memory of the process and all its children as the sum of
their proportional set sizes (PSS: like the resident set size, RSS, but a page shared by k
processes counts 1/k in each, so that Ray's shared object store and libraries count once):

* ``prepare`` with 1 and with 2 decode processes (``data.workers``): wall time, images/s, peak memory (PSS);
* the pretraining input pipeline: a Ray Train ``TorchTrainer`` with 2 workers streaming the
  prepared training split exactly as ``pipelines/pretrain_rectifier.py`` does
  (``get_dataset_shard`` + :func:`pipelines.pretrain_rectifier.stream`, batch 8) for 50 batches
  and no model: peak PSS of the whole local Ray cluster (raylet, workers, object store pages);
* an edit-training task's data reads: the ``edits`` image subset (``num_images``, 100) read
  from the shards, then 200 random batches of 4 drawn from the shards: peak PSS.

The goal (issue 11): every peak (PSS here) at 16,000 images within 1.25x of that at 1,000, and prepare
at least 1.6x faster with 2 workers than with 1 on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RES = 256


# --------------------------------------------------------------------------------- images
def _bases():
    import numpy as np
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    bases = [data.astronaut(), data.coffee(), data.chelsea()]
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as grace:
        bases.append(np.asarray(grace.convert("RGB")))
    return bases


def _make(args: tuple[str, int, int]) -> None:
    """JPEGs ``start .. stop - 1`` of a folder: crop, flip, jitter, resize to 256 px."""
    import numpy as np
    from PIL import Image

    folder, start, stop = args
    bases = _bases()
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        img = bases[i % len(bases)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y: y + side, x: x + side].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = crop * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)  # colour jitter
        out = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((RES, RES))
        out.save(Path(folder) / f"img_{i:06d}.jpg", quality=90)


def build_folder(folder: Path, n: int) -> float:
    """The N-image folder (reused when complete); returns the seconds spent building it."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    step = 250
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_make, [(str(folder), a, min(n, a + step)) for a in range(0, n, step)]))
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ measuring
def _pss(p) -> int:
    """Proportional set size: shared pages (libraries, Ray's object store) divided among the
    processes that map them, so that a sum over processes counts each page once."""
    return p.memory_full_info().pss


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; returns (wall seconds, peak memory of it and its children in bytes: the sum
    of their proportional set sizes, sampled every 0.1 s, and its output)."""
    import psutil

    start = time.perf_counter()
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                try:
                    total += _pss(p)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    out.seek(0)
    text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, peak, text


PREPARE = """
import sys
from hfedit.config import DataConfig
from hfedit.data.prepared import prepare_dataset
m = prepare_dataset(DataConfig(source=sys.argv[1], resolution=256, workers=int(sys.argv[3])),
                    sys.argv[2], progress=False)
print("ok", m.counts["ok"])
"""

PIPELINE = """
import os, sys
import ray
from ray.train import DataConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from hfedit.data.prepared import PreparedData
from pipelines.ray_runtime import split_dataset

def loop(config):
    import ray.train
    from pipelines.pretrain_rectifier import stream
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batches = stream(ray.train.get_dataset_shard("train"), 8, 0, rank, 0,
                     config["rows"] // world // 8, config["res"])
    for _ in range(int(config["batches"])):
        x = next(batches)
        assert x.shape == (8, 3, config["res"], config["res"])
    ray.train.report({"done": 1})

data = PreparedData(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ds = split_dataset(data, "train")
TorchTrainer(loop, train_loop_config={"rows": data.count("train"), "res": data.resolution,
                                      "batches": sys.argv[2]},
             datasets={"train": ds},
             dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True),
                                       enable_shard_locality=False),
             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
             run_config=ray.train.RunConfig(storage_path=sys.argv[3])).fit()
print("ok")
"""

EDIT_READS = """
import sys, torch
from hfedit.data.prepared import load_split
from hfedit.training.edits import select_images
split = load_split(sys.argv[1], "train")
x0 = select_images(split, 100, 0)          # the task's image subset, read from the shards
gen = torch.Generator().manual_seed(0)
total = 0.0
for _ in range(200):                      # random batches of 4 drawn from the shards
    total += float(split[torch.randint(0, len(split), (4,), generator=gen)].sum())
print("ok", tuple(x0.shape), total)
"""


def mib(b: int) -> str:
    return f"{b / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hfedit-data-scale")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--keep", action="store_true", help="keep the prepared folders")
    args = p.parse_args()
    env = {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    py = sys.executable
    rows = []
    for n in args.sizes:
        src = args.work / f"jpegs-{n}"
        gen_s = build_folder(src, n)
        row = {"n": n, "gen_s": gen_s}
        for workers in (1, 2):
            out = args.work / f"prepared-{n}-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, _ = measured([py, "-c", PREPARE, str(src), str(out), str(workers)], env)
            row[f"prep{workers}_s"], row[f"prep{workers}_rss"] = wall, peak
        shutil.rmtree(args.work / f"prepared-{n}-w1", ignore_errors=True)
        prepared = args.work / f"prepared-{n}-w2"
        storage = Path(tempfile.mkdtemp(prefix="ray-train-", dir=args.work))
        _, row["pipe_rss"], _ = measured([py, "-c", PIPELINE, str(prepared), str(args.batches),
                                          str(storage)], env)
        shutil.rmtree(storage, ignore_errors=True)
        _, row["edit_rss"], _ = measured([py, "-c", EDIT_READS, str(prepared)], env)
        if not args.keep:
            shutil.rmtree(prepared, ignore_errors=True)
        rows.append(row)
        print(f"[data_scale] {n} images done: {row}", file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(f"\n256 px JPEGs; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
          f"{os.cpu_count()} CPUs\n")
    print("| images | prepare, 1 worker: s (img/s) | 2 workers: s (img/s) | speed-up "
          "| prepare peak PSS 1 / 2 workers, MiB | pretraining input peak PSS, MiB "
          "| edit-training reads peak PSS, MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["n"]
        print(f"| {n} | {r['prep1_s']:.1f} ({n / r['prep1_s']:.0f}) | {r['prep2_s']:.1f} "
              f"({n / r['prep2_s']:.0f}) | {r['prep1_s'] / r['prep2_s']:.2f}x "
              f"| {mib(r['prep1_rss'])} / {mib(r['prep2_rss'])} | {mib(r['pipe_rss'])} "
              f"| {mib(r['edit_rss'])} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"\npeak PSS at {b['n']} / at {a['n']} images: prepare (2 workers) "
              f"{b['prep2_rss'] / a['prep2_rss']:.2f}x, prepare (1 worker) "
              f"{b['prep1_rss'] / a['prep1_rss']:.2f}x, pretraining input "
              f"{b['pipe_rss'] / a['pipe_rss']:.2f}x, edit-training reads "
              f"{b['edit_rss'] / a['edit_rss']:.2f}x")


if __name__ == "__main__":
    main()
