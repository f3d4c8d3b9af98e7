"""Images x attributes per second of the batch edit at K attributes, per batch size.

    .venv/bin/python benchmarks/edit_batch_attributes.py [--n 32] [--steps 10] [--batches 1 4 16]
    HFEDIT_CODE=/path/to/other/checkout .venv/bin/python benchmarks/edit_batch_attributes.py

The same N real images (``benchmarks/edit_batch.py``'s), K = 3 attributes (``reconstruction`` and
two edit rectifiers of the default architecture, ResNet34 trunk, heads perturbed so the offsets
are not zero), the default tiny backbone with random weights (the cost is the architecture's),
one process and one torch thread: ``run_job`` with the plain-loop executor (the job's Ray Data
stages called in a loop, no Ray), every run writing to a fresh folder.

``HFEDIT_CODE`` runs the same measurement against another checkout (e.g. the code before the
batched replay); ``--set inversion.condition=live`` selects the live conditioning. Wall time is
end to end (model loading included); "work" is the time spent decoding, inverting, editing
and writing, from the manifest. Batch sizes are interleaved, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("HFEDIT_CODE") or Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Data (a private local Ray, 2 CPUs, edit_batch.actors=1) "
                        "instead of the plain loop; Ray's start-up is not timed")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HFEDIT_ROOT"] = str(ROOT)
    import torch

    torch.set_num_threads(1)
    from edit_batch import busy_seconds, write_images  # benchmarks/edit_batch.py

    sys.path.insert(0, str(ROOT))  # that module puts its own checkout first
    from hfedit.models.backbone import new_denoiser, save_backbone
    from hfedit.models.checkpoint import save_rectifier
    from hfedit.config import HfeditConfig, load_config
    from hfedit.models.rectifier import build_rectifier
    from pipelines.edit_batch import execute_plain, run_job

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from tests.conftest import perturbed

    work = Path(tempfile.mkdtemp(prefix="ebk"))
    cfg0 = HfeditConfig()
    torch.manual_seed(0)
    d = new_denoiser(cfg0.backbone, 32).freeze()
    save_backbone(d, work / "backbone")
    base = build_rectifier(cfg0.rectifier, d.unet)
    for k, name in enumerate(("smiling", "old")):
        save_rectifier(work / "edits" / name, perturbed(base, 0.05, seed=k + 1))
    write_images(work / "images", args.n)
    attrs = ["reconstruction", "smiling", "old"]
    executor = execute_plain
    if args.ray:
        import ray

        from pipelines.edit_batch import execute as executor

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1 as given
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=bool(os.environ.get("RAY_LOG")),
                 _node_ip_address="127.0.0.1", _temp_dir=tempfile.mkdtemp(prefix="rayk", dir="/tmp"),
                 runtime_env={"env_vars": {"HFEDIT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1",
                                           "PYTHONPATH": str(ROOT)}})
    best: dict[int, tuple[float, float]] = {}
    loads = []
    try:
        for rep in range(args.repeats):
            for bs in args.batches:
                cfg = load_config(overrides=[
                    f"inversion.num_steps={args.steps}", f"edit_batch.batch_size={bs}",
                    f"edit_batch.attributes=[{','.join(attrs)}]", "edit_batch.torch_threads=1",
                    f"edit_batch.edits_dir={work / 'edits'}", "edit_batch.actors=1", *args.sets])
                loads.append(os.getloadavg()[0])
                start = time.perf_counter()
                result = run_job(cfg, work / "images", work / f"out{bs}_{rep}", str(work / "backbone"),
                                 progress=False, executor=executor)
                wall = time.perf_counter() - start
                assert result.counts["edited_now"] == args.n, (result.counts, result.error)
                best[bs] = min(best.get(bs, (float("inf"), 0.0)), (wall, busy_seconds(result.manifest)))
                print(f"  batch {bs}: {wall:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.ray:
            ray.shutdown()
    k = len(attrs)
    print(f"\ncode: {ROOT}; {args.n} images x K = {k} attributes, N = {args.steps}, "
          f"{'Ray Data, 1 actor' if args.ray else 'plain loop'}, "
          f"1 torch thread, {os.cpu_count()} CPUs, load average {min(loads):.1f}-{max(loads):.1f}"
          + (f", {' '.join(args.sets)}" if args.sets else ""))
    print(f"{'batch':>6}{'wall s':>9}{'images/s':>10}{'img x attr/s':>14}{'work s':>9}"
          f"{'img x attr/s (work)':>21}")
    for bs, (wall, busy) in best.items():
        print(f"{bs:>6}{wall:>9.1f}{args.n / wall:>10.2f}{args.n * k / wall:>14.2f}{busy:>9.1f}"
              f"{args.n * k / busy:>21.2f}")


if __name__ == "__main__":
    main()
