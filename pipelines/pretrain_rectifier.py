"""Reconstruction pretraining of the rectifier on Ray Train (DDP over ``num_workers`` ranks).

    python pipelines/pretrain_rectifier.py --backbone models/backbone --data data/prepared \
        --out models/rectifier --checkpoints checkpoints/rectifier --metrics metrics/pretrain_rectifier.json

Each worker runs :func:`hfedit.training.reconstruction.reconstruction_step` on its part of the training split,
streamed by Ray Data (``get_dataset_shard``; a local shuffle seeded per epoch, see :func:`stream`;
a part small enough is kept after the first epoch, :class:`EpochRows`);
DDP (gloo on CPU, nccl on GPU) averages the rectifier's gradients. Every
``pretrain.checkpoint_every`` steps rank 0 reports a checkpoint (safetensors + JSON); when a
worker dies Ray restarts the group from it (``runtime.ray.max_failures``), and a rerun of the
stage with the same config resumes from the last one. Rank 0 logs metrics to the stage's MLflow
run. At the end the driver writes ``<out>`` and the held-out reconstruction report with and
without the rectifier (``<metrics>``), and logs both. ``--backbone``, ``--data``,
``--checkpoints`` and ``--out`` may be store URIs: each worker fetches the backbone into its
node's cache, Ray Train keeps the checkpoints there, ``<out>`` is exported from the store's.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from hfedit.models.backbone import load_backbone
from hfedit.models.checkpoint import (
    RECTIFIER,
    checkpoint_complete,
    file_digest,
    fingerprint,
    flatten_optimizer,
    load_checkpoint,
    load_rectifier,
    model_reference,
    module_digests,
    save_checkpoint,
    save_rectifier,
    unflatten_optimizer,
)
from hfedit.config import ConfigError, HfeditConfig, project_root, to_flat_dict
from hfedit.progress import progress
from hfedit.data.images import pixels_to_tensor
from hfedit.data.prepared import PreparedData, data_location, load_split
from hfedit.device import check_precision, placement, wants_gpu
from hfedit.files import replace_folder
from hfedit.storage import Location, copy_tree, is_uri, local_copy
from hfedit.training.augment import augment
from pipelines.entry import parse_and_load, run_main, stage_parser
from pipelines.ray_runtime import cluster_gpus, init_ray, split_dataset
from pipelines.tracking import stage_run
from pipelines.serving import log_rectifier_model

STATE = "train_state"
# The rectifier's own images (data.rectifier_fraction; the backbone's when that is 0)
SPLIT = "rectifier"
# Logged to MLflow as their mean over the steps since the previous logged step.
MEANED = ("loss", "noise_mse", "plain_noise_mse", "delta_rms")
# A checkpoint is resumed only by a run of the same code (see :func:`train`'s fingerprint).
CODE_MODULES = ("hfedit.models.rectifier", "hfedit.models.modulation", "hfedit.training.reconstruction",
                "hfedit.diffusion.schedule", "hfedit.models.backbone", "hfedit.training.augment",
                "pipelines.pretrain_rectifier")


# Rows each worker shuffles among (its local shuffle buffer; 48 MiB at 256 px).
SHUFFLE_BUFFER = 256
# A worker keeps its part of the split after the first epoch when it is at most this large
# (64 MiB: ~340 images at 256 px, all 82 bundled faces at 32 px), and reads it from the shards
# again every epoch when it is larger. Each epoch's pass through Ray Data starts a streaming
# execution; a small split has a few batches per epoch (5 on the offline default), so that
# start-up cost as much as the steps (measured on the 2-core machine, offline default, idle:
# 47 s per 50 steps reading every epoch, 28 s keeping the rows), while past ~40 batches an
# epoch it is amortised.
EPOCH_CACHE_BYTES = 64 << 20


class EpochRows:
    """This worker's rows of the split (the ``pixels`` column, bytes), in the order its Ray
    Data shard (``get_dataset_shard``, ``preserve_order``) yields them: read from the shard
    every epoch, or kept from the first complete pass when they fit in ``cache_bytes``. Both
    give the same rows in the same order, so the batches do not depend on the cache."""

    def __init__(self, shard, cache_bytes: int = EPOCH_CACHE_BYTES):
        self.shard, self.cache_bytes = shard, cache_bytes
        self.kept: list[bytes] | None = None
        self.fits = True  # until a pass finds more than cache_bytes

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[bytes] | None = [] if self.fits else None
        size = 0
        for batch in self.shard.iter_batches(batch_size=SHUFFLE_BUFFER, batch_format="numpy"):
            for px in batch["pixels"]:
                if kept is not None:
                    size += len(px)
                    if size <= self.cache_bytes:
                        kept.append(px)
                    else:
                        kept, self.fits = None, False  # too large: read the shards every epoch
                yield px
        if kept is not None:  # a complete pass that fits
            self.kept = kept


def local_shuffle(rows, buffer: int, rng):
    """``rows`` in a local shuffle: a buffer of ``buffer`` rows, each output drawn from it
    uniformly by ``rng`` (a numpy Generator) and replaced by the next input."""
    buf: list = []
    for row in rows:
        buf.append(row)
        if len(buf) >= buffer:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


def epoch_batches(rows: EpochRows, batch_size: int, seed: int, rank: int, epoch: int,
                  resolution: int, skip: int = 0):
    """This worker's batches of ``epoch``: its rows in a local shuffle seeded by (seed, rank,
    epoch), whole batches only, as (B, 3, R, R) float32 on the CPU (converted per batch); the
    first ``skip`` batches are drawn but not converted (a resumed run continues mid-epoch)."""
    import numpy as np

    rng = np.random.default_rng([seed, rank, epoch])
    batch: list[bytes] = []
    k = 0
    for px in local_shuffle(iter(rows), SHUFFLE_BUFFER, rng):
        batch.append(px)
        if len(batch) == batch_size:
            if k >= skip:
                yield pixels_to_tensor(batch, resolution)
            batch, k = [], k + 1


def stream(shard, batch_size: int, seed: int, rank: int, start: int, per_epoch: int,
           resolution: int, cache_bytes: int = EPOCH_CACHE_BYTES):
    """Endless batches from step ``start`` on: epoch ``start // per_epoch``, batch
    ``start % per_epoch`` of it, then the next epochs. ``per_epoch``: whole batches of this
    worker's rows (Ray Train splits a dataset into equal row counts)."""
    rows = EpochRows(shard, cache_bytes)
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from epoch_batches(rows, batch_size, seed, rank, epoch, resolution, skip)
        epoch, skip = epoch + 1, 0


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Randomness of (rank, step) alone: a resumed run draws exactly what the first would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)


def initial_rectifier(cfg: HfeditConfig, unet: torch.nn.Module):
    """The rectifier a run starts from, drawn from ``pretrain.seed`` alone (DDP broadcasts rank
    0's to the others), so that a rerun of the same config trains the same rectifier."""
    from hfedit.models.rectifier import build_rectifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.pretrain.seed)
        return build_rectifier(cfg.rectifier, unet)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: prepare -> loop over hfedit step functions -> report (+ checkpoint)."""
    import ray.train
    import ray.train.torch
    from omegaconf import OmegaConf

    from hfedit.models.rectifier import ModulatedDenoiser
    from hfedit.training.reconstruction import (
        ReconstructionObjective,
        make_optimizer,
        reconstruction_step,
    )

    cfg: HfeditConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(HfeditConfig), config["cfg"]))
    pc, rc = cfg.pretrain, cfg.runtime.ray
    torch.set_num_threads(max(1, rc.torch_threads_per_worker))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("pid_dir"):  # lets operators (and tests) find and signal the workers
        Path(config["pid_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(config["pid_dir"]) / f"rank{rank}.pid").write_text(str(os.getpid()))
    device = ray.train.torch.get_device()  # the GPU Ray gave this rank, or the CPU
    precision = check_precision(cfg.runtime.precision, "training", device)
    # a backbone on a store is fetched into this node's cache (the driver sends the URI)
    denoiser = load_backbone(local_copy(config["backbone"]), device=device, precision=precision)
    rectifier = initial_rectifier(cfg, denoiser.unet)
    opt, lr_sched = make_optimizer(rectifier, pc.lr, pc.weight_decay, pc.lr_decay_every, pc.lr_decay)

    start, restarts = 0, 0
    checkpoint = _resume_point(ray.train.get_checkpoint(), config)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            ck = load_checkpoint(folder, STATE)
            rectifier.load_state_dict({k[4:]: v for k, v in ck.tensors.items() if k.startswith("rec.")})
            opt.load_state_dict(unflatten_optimizer(ck.tensors, ck.meta["optim"]))
            lr_sched.load_state_dict(ck.meta["lr_sched"])
            start, restarts = int(ck.meta["step"]), int(ck.meta.get("restarts", 0)) + 1
    objective = ray.train.torch.prepare_model(
        ReconstructionObjective(
            ModulatedDenoiser(denoiser, rectifier, checkpoint=cfg.runtime.activation_checkpointing),
            pc.loss, pc.dw_weight),
        parallel_strategy="ddp")
    # This rank's part of the training split, streamed by Ray Data (only the current batch and
    # the shuffle buffer are in memory); the batch goes to the device alone.
    per_epoch = config["train_rows"] // world // pc.batch_size
    batches = stream(ray.train.get_dataset_shard(SPLIT), pc.batch_size, pc.seed, rank, start,
                     per_epoch, config["resolution"])
    tracker = _rank0_tracker(config) if rank == 0 else None
    T = denoiser.schedule.num_train_timesteps
    window: dict[str, list[float]] = {}

    bar = progress(total=pc.steps, initial=start, desc="pretrain (rank 0)", unit="step",
                   disable=rank != 0)
    for step in range(start, pc.steps):
        bar.update(1)
        gen = _step_generator(pc.seed, rank, step)
        x0 = next(batches)
        if not pc.augment.off:  # drawn from this step's generator: a resumed run draws the same
            x0 = augment(x0, pc.augment, gen)
        if config.get("batch_log"):  # which images each step saw (tests of determinism)
            with open(Path(config["batch_log"]) / f"rank{rank}.txt", "a") as f:
                f.write(f"{step} {float(x0.double().sum()):.10g}\n")
        stats = reconstruction_step(objective, opt, x0.to(device), gen, T)
        lr_sched.step()
        done = step + 1
        metrics = {"loss": stats.loss, "noise_mse": stats.noise_mse,
                   "plain_noise_mse": stats.plain_noise_mse, "delta_rms": stats.delta_rms,
                   "lr": lr_sched.get_last_lr()[0], "step": done, "restarts": restarts}
        for k in MEANED:  # one batch is noisy: MLflow gets the mean since the last point
            window.setdefault(k, []).append(metrics[k])
        if done % pc.log_every == 0 or done == pc.steps:
            if tracker is not None:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                tracker.log_metrics({f"pretrain/{k}": means.get(k, v) for k, v in metrics.items()
                                     if k != "step"}, step=done)
            window.clear()
        if done % pc.checkpoint_every == 0 or done == pc.steps:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    opt_tensors, opt_meta = flatten_optimizer(opt.state_dict())
                    tensors = {f"rec.{k}": v for k, v in rectifier.state_dict().items()}
                    tensors.update(opt_tensors)
                    save_checkpoint(tmp, STATE, tensors, {
                        "step": done, "optim": opt_meta, "lr_sched": lr_sched.state_dict(),
                        "restarts": restarts, "run_fingerprint": config["fingerprint"],
                        "metrics": metrics})
                    save_rectifier(tmp, rectifier, {"step": done, "backbone": config["backbone_ref"]})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                # Ray Train only hears of checkpoints (each report logs a line per worker);
                # the curves go to MLflow directly, above
                ray.train.report(metrics, checkpoint=ckpt)
    bar.close()


def _resume_point(committed, config: dict):
    """The checkpoint a (re)started worker group resumes from: the newest *complete* one of this
    run, whether Ray committed it or it is only on disk. Ray Train commits a checkpoint once the
    controller has collected every rank's report; a worker killed just after rank 0 wrote one can
    restart the group with the previous (or no) committed checkpoint, although a whole newer one
    is on disk. Every rank scans the same folder while no rank is writing, so all pick the same.
    """
    best, best_step = committed, -1
    if committed is not None:
        with committed.as_directory() as folder:  # the step from the JSON, not the tensors
            best_step = int(json.loads((Path(folder) / f"{STATE}.json").read_text())["step"])
    if config.get("storage"):
        on_disk, step = latest_checkpoint(config["storage"], config["fingerprint"])
        if on_disk is not None and step > best_step:
            best = on_disk
    return best


def _rank0_tracker(config: dict):
    """Rank 0 logs into the stage's MLflow run, which the driver created."""
    if not config.get("mlflow_run_id"):
        return None
    from pipelines.tracking import attach_run

    return attach_run(config["mlflow_uri"], config["mlflow_run_id"])


# ------------------------------------------------------------------------------- driver
def latest_checkpoint(storage: str | Path, run_fingerprint: str):
    """The newest reported checkpoint of a run with this fingerprint under ``storage`` (a folder
    or a store URI: Ray Train's ``storage_path``)."""
    import ray.train

    loc = Location(storage)
    if loc.local is None:
        return _latest_stored_checkpoint(loc, run_fingerprint)
    best, best_step = None, -1
    for meta_file in loc.local.glob(f"**/{STATE}.json"):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):  # being copied
            continue
        if meta.get("run_fingerprint") == run_fingerprint and meta["step"] > best_step:
            if checkpoint_complete(meta_file.parent, STATE):
                best, best_step = meta_file.parent, meta["step"]
    return (ray.train.Checkpoint.from_directory(str(best)), best_step) if best else (None, 0)


def _latest_stored_checkpoint(loc: Location, run_fingerprint: str):
    """:func:`latest_checkpoint` on an object store: objects are written whole, so a checkpoint
    is complete when its tensors object has the size its JSON recorded (its digest would cost a
    download per candidate)."""
    import ray.train

    files = loc.files()
    best, best_step = None, -1
    for rel in (r for r in files if r.endswith(f"/{STATE}.json")):
        try:
            meta = json.loads(loc.read_bytes(rel))
        except (OSError, ValueError):
            continue
        folder = rel.rsplit("/", 1)[0]
        size = files.get(f"{folder}/{STATE}.safetensors")
        if (meta.get("run_fingerprint") == run_fingerprint and meta["step"] > best_step
                and size is not None and size == meta.get("data_bytes", size)):
            best, best_step = folder, meta["step"]
    if best is None:
        return None, 0
    return ray.train.Checkpoint(path=f"{loc.root}/{best}", filesystem=loc.fs), best_step


def train(cfg: HfeditConfig, backbone: str | Path, data: Path, out: Path, checkpoints: str | Path,
          mlflow_run_id: str = "", mlflow_uri: str = "", pid_dir: str = "",
          batch_log: str = "") -> dict:
    """Run the TorchTrainer; copy the final rectifier to ``out``. Returns the final metrics.

    ``checkpoints`` is Ray Train's ``storage_path``: a folder every node sees, or a store URI
    (``s3://bucket/checkpoints``; rank 0's checkpoints are uploaded there by Ray Train, resumed
    from there, and the final rectifier is exported from there, never from a node's own disk)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ray.data
    from ray.train import DataConfig

    rc = cfg.runtime.ray
    use_gpu = wants_gpu(cfg.runtime.device, cluster_gpus())
    local = local_copy(backbone)  # a store's backbone: this node's copy, for its digest
    prepared = PreparedData(data)
    per_worker = prepared.count(SPLIT) // rc.num_workers
    if per_worker < cfg.pretrain.batch_size:
        raise ConfigError(f"pretrain.batch_size={cfg.pretrain.batch_size} is more than the "
                          f"{per_worker} images of the rectifier's split each of runtime.ray.num_workers="
                          f"{rc.num_workers} workers gets from {data}: lower the batch size or "
                          "the workers, or prepare more images")
    run_fp = fingerprint({"pretrain": to_flat_dict(cfg.pretrain), "rectifier": to_flat_dict(cfg.rectifier),
                          "backbone": file_digest(local / "unet" / "diffusion_pytorch_model.safetensors"),
                          "data": prepared.digest, "workers": rc.num_workers,
                          "targets": file_digest(project_root() / cfg.rectifier.targets_file),
                          "code": module_digests(CODE_MODULES)})
    storage = str(checkpoints) if is_uri(checkpoints) else str(Path(checkpoints).resolve())
    resume, resume_step = latest_checkpoint(storage, run_fp)
    if resume is not None and resume_step >= cfg.pretrain.steps:  # finished before: nothing to do
        with resume.as_directory() as folder:
            _export(Path(folder), out)
            meta = load_checkpoint(folder, STATE).meta
        return {**meta.get("metrics", {}), "resumed_from_step": resume_step,
                "restarts": meta.get("restarts", 0)}
    # Read tasks ask for no CPU (ray_runtime.split_dataset): they only move Parquet pages, the
    # float conversion happens in the workers, per batch.
    train_ds = split_dataset(prepared, SPLIT)
    # preserve_order and no locality hints: the same rows reach the same rank in every run
    # (Ray Train's reproducibility recipe), so a seed fixes every batch.
    ingest = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": _config_dict(cfg),
            "backbone": str(backbone) if is_uri(backbone) else str(local.resolve()),
            "backbone_ref": model_reference(backbone),
            "data": data_location(data), "fingerprint": run_fp, "mlflow_run_id": mlflow_run_id,
            "mlflow_uri": mlflow_uri, "pid_dir": pid_dir, "storage": storage,
            "train_rows": prepared.count(SPLIT), "resolution": prepared.resolution,
            "batch_log": batch_log,
        },
        datasets={SPLIT: train_ds},
        dataset_config=DataConfig(execution_options=ingest, enable_shard_locality=False),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": rc.cpus_per_worker}),
        run_config=RunConfig(
            name=f"pretrain_rectifier-{run_fp}", storage_path=storage,
            failure_config=FailureConfig(max_failures=rc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        resume_from_checkpoint=resume,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("pretrain_rectifier: training reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        _export(Path(folder), out)
        state_meta = load_checkpoint(folder, STATE).meta
    return {**state_meta["metrics"], "resumed_from_step": resume_step,
            "restarts": state_meta.get("restarts", 0)}


def _export(folder: Path, out: str | Path) -> None:
    """Copy the rectifier files of a reported checkpoint to the stage's output folder, replacing
    it whole (a failed copy leaves the previous rectifier in place); to a store prefix each file
    one PUT, the JSON sidecar deleted first and written last (complete when it is there)."""
    names = (f"{RECTIFIER}.safetensors", f"{RECTIFIER}.json")
    if is_uri(out):
        copy_tree(folder, out, last=(names[1],), names=names)
    else:
        replace_folder(out, lambda tmp: copy_tree(folder, tmp, names=names))


def _config_dict(cfg: HfeditConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def evaluate(cfg: HfeditConfig, backbone: Path, data: Path, rectifier_dir: Path) -> dict:
    """Held-out reconstruction at ``pretrain.eval_steps``: backbone vs rectifier."""
    from hfedit.evaluation.reconstruction import reconstruction_report

    torch.manual_seed(0)
    device, precision = placement(cfg.runtime.device, cfg.runtime.precision, "evaluation")
    denoiser = load_backbone(backbone, device, precision)
    rectifier, _ = load_rectifier(rectifier_dir, denoiser.unet, device=str(device))
    images = load_split(data, "val")[: cfg.pretrain.eval_images]
    n, sizes = cfg.pretrain.eval_steps, {"batch_size": cfg.runtime.eval_batch_size,
                                         "gap_timesteps": cfg.pretrain.eval_gap_timesteps}
    plain = reconstruction_report(denoiser, images, n, **sizes)
    rect = reconstruction_report(denoiser, images, n, rectifier=rectifier, **sizes)
    return {"num_steps": n, "images": int(images.shape[0]), "backbone": plain, "rectifier": rect,
            "improvement": {k: plain[k] - rect[k] for k in ("l1", "l2", "gap")}}


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("Rectifier reconstruction pretraining (Ray Train).", data=True)
    parser.add_argument("--backbone", default="models/backbone",
                        help="a folder, or a store URI every node fetches (s3://bucket/prefix)")
    parser.add_argument("--out", default="models/rectifier",
                        help="the rectifier: a folder, or a store URI (s3://bucket/prefix)")
    parser.add_argument("--checkpoints", default="checkpoints/rectifier",
                        help="Ray Train's storage: a folder every node sees, or s3://bucket/prefix")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/pretrain_rectifier.json"))
    parser.add_argument("--pid-dir", default="", help="workers write rank<k>.pid here")
    parser.add_argument("--batch-log", default="", help="workers append '<step> <batch sum>' "
                        "lines to rank<k>.txt here (which images each step saw)")
    args, cfg = parse_and_load(parser, argv)
    from hfedit.validation import check_stores

    check_stores(args, ("--backbone", "--data"), ("--checkpoints", "--out"))
    backbone = local_copy(args.backbone)  # this node's copy of a store's backbone
    init_ray(cfg)
    from pipelines.tracking import tracking_uri, write_metrics

    with stage_run(cfg, "pretrain_rectifier") as tracker:
        final = train(cfg, args.backbone, args.data, args.out, args.checkpoints,
                      mlflow_run_id=tracker.run_id, mlflow_uri=tracking_uri(cfg), pid_dir=args.pid_dir,
                      batch_log=args.batch_log)
        rectifier = local_copy(args.out)  # this node's copy of a rectifier written to a store
        report = evaluate(cfg, backbone, args.data, rectifier)
        report["training"] = {k: final[k] for k in ("loss", "noise_mse", "plain_noise_mse",
                                                    "step", "restarts", "resumed_from_step")}
        written = write_metrics(args.metrics, report, "pretrain_rectifier")
        for model in ("backbone", "rectifier"):
            tracker.log_metrics({f"pretrain/held_out/{model}/{k}": v
                                 for k, v in report[model].items()},
                                step=cfg.pretrain.steps)
        for path in written:
            tracker.log_artifact(path)
        log_rectifier_model(cfg, tracker.run_id, backbone, rectifier, "rectifier", "rectifier",
                            tags={"hfedit.kind": "reconstruction",
                                  "hfedit.backbone": model_reference(args.backbone)["source"],
                                  **{f"held_out_{k}_improvement": f"{v:.6g}"
                                     for k, v in report["improvement"].items()}})
    imp = report["improvement"]
    print(f"pretrain_rectifier: held-out L1 {report['backbone']['l1']:.4f} -> "
          f"{report['rectifier']['l1']:.4f}, gap {report['backbone']['gap']:.4f} -> "
          f"{report['rectifier']['gap']:.4f} (better by {imp['l1']:.4f} / {imp['gap']:.4f})")
    return report


if __name__ == "__main__":
    run_main("pretrain_rectifier", main,
             uri_flags=("--backbone", "--data", "--checkpoints", "--out"))
