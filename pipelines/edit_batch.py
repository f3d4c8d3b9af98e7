"""Batch inversion + editing of many images on Ray Data.

    python pipelines/edit_batch.py --input photos/ --out outputs/photos \
        [--attributes reconstruction smiling] [--actors 2 --batch-size 4 --num-gpus 0]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/edit_batch.py --input /abs/photos --out /abs/outputs/photos ...
    dvc repro edit_batch    # the val split: --input data/prepared --split val --out outputs/val

Inputs: a folder (searched recursively), a list file (one path per line, relative to ``--root``,
default the list file's folder) or a prepared split. The driver only lists files; Ray Data runs three
stages (:mod:`pipelines.batch_actor`): decode + preprocess in CPU tasks with the prepare stage's
code (``load_image`` + ``to_tensor``; a bad input becomes its error row there) -> the model in
:class:`EditImages` actors (``num_cpus``/``num_gpus``; the backbone and rectifiers loaded once
per actor; each batch inverted once and replayed for every attribute in one batch; arrays in and
out) -> PNG writing, metrics and the done-log in CPU tasks.

Outputs: ``<out>/<attribute>/<id>.png`` (``id``: the path relative to the input folder; written
to a temporary name and renamed, so no partial PNG ever appears) and ``<out>/manifest.parquet``,
one row per (input, attribute): input, output, seed, timings, L1/SSIM to the source (and the max
error of ``reconstruction``), or the reason it failed. Every input gets its rows.

Determinism: image ``id``'s noise comes from seed sha256(f"{inversion.seed}:{id}"); each batch of
``edit_batch.batch_size`` images is inverted once and replayed for all its attributes in one
batch. The same images in the same batches give identical PNGs whatever the actors or the
scheduling; another batch size changes the edits only by float rounding (within 1e-5 before
quantisation: batched CPU kernels are not bit-invariant).

Resume: as soon as an image's PNGs are in place its rows are appended (one write, fsync) to
``<out>/_log/<run>-<pid>-*.jsonl``. A rerun skips every (input, attribute) whose logged row matches
the job's fingerprint (backbone, rectifier, inversion and preprocessing settings) and the input
file's size and content digest (sha256), and whose PNG exists; an actor retrying a batch after a crash skips the
images already logged. Ray Data restarts a dead actor and retries its batch; an image on which
workers died ``edit_batch.max_attempts`` times becomes a ``worker_crashed`` row instead of
killing workers forever.

Exit status: 0 every input edited; 3 the job finished and some inputs failed (reasons in the
manifest; ``--allow-failed`` makes that 0); 2 bad arguments or configuration (nothing done); 1
the job itself failed, 130 interrupted by Ctrl-C (SIGINT) and 143 stopped by SIGTERM (``ray job
stop``, ``kill``) (all after writing the manifest of what was done, and the summary).
"""


from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from hfedit.config import ConfigError, HfeditConfig, load_config
from hfedit.data.batch_manifest import read_manifest
from hfedit.data.manifest import SPLITS
from hfedit.device import DeviceUnavailable
from hfedit.storage import Location, is_uri
from pipelines.batch_actor import (EditImages, backbone_resolution, columns, decode_images,
                                   error_row, write_outputs)
from pipelines.ray_runtime import actor_gpus
from pipelines.batch_store import (  # noqa: F401 (LOCK, lock_path, ...: this module's API)
    BACKBONE_DEFAULT, LOCK, LOCK_FRESH_S, _locked, _remove_temporaries, _store_locked,
    ignored_files, lock_path, log_manifest, output_location, resolve_model_uris)
from pipelines.batch_output import (  # noqa: F401 (count, ...: this module's API)
    StopOnSignals, _compact_logs, _reserve_space, _write_manifest, count, metrics_dict,
    stale_outputs, summary_line, summary_table)
from pipelines.batch_job import (  # noqa: F401 (LOG_DIR, output_relpath, ...: this module's API)
    COLUMNS, COMPACTED, EXIT_CRASHED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, LOG_DIR,
    MANIFEST, NOT_PROCESSED, RETRIED, DoneIndex, Entry, Job, UsageError, check_attributes, from_wire,
    image_seed, is_complete, is_image_name, list_inputs, make_job, output_names,
    log_line, output_relpath, resolved, to_display, to_wire)


# ------------------------------------------------------------------------- the driver
# CPUs of each decode and write task: small, so that on a 2-core machine they run beside actors
# holding num_cpus each (an actor pool that takes every CPU stalls Ray Data: DESIGN.md).
TASK_CPUS = 0.25


@dataclass
class JobResult:
    manifest: pd.DataFrame  # one row per (input, attribute)
    counts: dict
    exit_code: int
    run: str
    seconds: float
    table: str = ""
    summary: str = ""
    error: str = ""
    ignored: list[str] = dataclasses.field(default_factory=list)  # not images by their suffix
    stale: list[str] = dataclasses.field(default_factory=list)  # outputs of no current input
    stale_removed: bool = False


def plan(entries: list[Entry], job: Job, done: DoneIndex, global_seed: int
         ) -> tuple[list[dict], list[dict]]:
    """Split the work: (items for Ray Data, each with its pending attributes; rows that already
    stand: logged before, or inputs refused while listing)."""
    out = Location(job.out)
    present = out.files() if out.local is None else None  # one listing, not a HEAD per output
    items, rows = [], []
    for e in entries:
        seed = image_seed(global_seed, e.id)
        if e.error is not None:
            rows += [error_row({"id": e.id, "attribute": a, "input": e.input, "seed": seed,
                             "run": job.run, "signature": e.signature,
                             "fingerprint": job.fingerprints[a]}, e.error.reason, e.error)
                     for a in job.attributes]
            continue
        pending = []
        for a in job.attributes:
            row = done.rows.get((e.id, a))
            if is_complete(row, e.signature, job.fingerprints[a], out, present):
                rows.append(row)
            else:
                pending.append(a)
        if pending:
            items.append(to_wire({"id": e.id, "input": e.input, "signature": e.signature,
                                  "index": e.index, "seed": seed, "pending": ",".join(pending),
                                  "name": e.name or e.id}))
    return items, rows


def execute(items: list[dict], job: Job, cfg: HfeditConfig, on_batch: Callable[[pd.DataFrame], None],
            progress: bool = True) -> None:
    """The job as three Ray Data stages (Ray must be initialised): decode in CPU tasks ->
    :class:`EditImages` actors (``edit_batch.num_cpus``/``num_gpus``, batches of
    ``edit_batch.batch_size`` images, arrays in and out) -> PNGs and done-log in CPU tasks.

    The decode and write tasks run on this process's node, whose disk holds ``--input`` and
    ``--out``; only the model actors spread over the cluster (images and edits cross Ray's object
    store). Writers on other nodes had put PNGs on those nodes' own disks while the job counted
    them done (a cluster whose nodes have their own disks)."""
    import ray

    eb = cfg.edit_batch
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    n_blocks = max(1, math.ceil(len(items) / eb.batch_size))
    gpus = actor_gpus(cfg)
    gpu = {"num_gpus": gpus} if gpus > 0 else {}
    job = dataclasses.replace(job, device="cuda" if gpus > 0 else "cpu")
    # One block per batch of edit_batch.batch_size consecutive items, and every stage takes
    # whole blocks (batch_size=None): the model sees exactly the plain loop's batches, so the
    # same batch size gives the same PNGs (from_items' even split and Ray Data's re-batching of
    # decoded blocks regrouped images across batches: PNGs differing by one level in CI).
    common = {"batch_size": None, "batch_format": "numpy"}
    step = eb.batch_size
    blocks = [pd.DataFrame(items[i:i + step]) for i in range(0, len(items), step)]
    # every node carries its id as the label ray.io/node-id (a hard constraint, as
    # NodeAffinitySchedulingStrategy(soft=False), which Ray Data takes only as deprecated
    # ray_remote_args)
    here = {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
    ds = (ray.data.from_pandas(blocks)
          .map_batches(decode_images, fn_kwargs={"job": job, "size": backbone_resolution(job.backbone)},
                       num_cpus=TASK_CPUS, **here, **common)
          .map_batches(EditImages, fn_constructor_kwargs={"job": job},
                       compute=ray.data.ActorPoolStrategy(size=max(1, min(eb.actors, n_blocks))),
                       num_cpus=eb.num_cpus, **gpu, **common)
          .map_batches(write_outputs, fn_kwargs={"job": job}, num_cpus=TASK_CPUS, **here,
                       batch_size=None, batch_format="numpy"))  # an actor batch's rows together
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        on_batch(batch)


def execute_plain(items: list[dict], job: Job, cfg: HfeditConfig,
                  on_batch: Callable[[pd.DataFrame], None], progress: bool = True) -> None:
    """The same three stages in a plain loop in this process (no Ray): the benchmark's
    baseline, and a way to debug one image."""
    model, size = EditImages(job), backbone_resolution(job.backbone)
    step = cfg.edit_batch.batch_size
    for start in range(0, len(items), step):
        chunk = columns([from_wire(i) for i in items[start:start + step]], list(items[0]))
        on_batch(pd.DataFrame(write_outputs(model(decode_images(chunk, job, size)), job)))


Executor = Callable[[list[dict], Job, HfeditConfig, Callable[[pd.DataFrame], None], bool], None]


def _check_resources(cfg: HfeditConfig) -> None:
    import ray

    eb, have = cfg.edit_batch, ray.cluster_resources()  # (their signs: checked by load_config)
    try:
        gpus = actor_gpus(cfg)
    except DeviceUnavailable as err:
        raise UsageError(str(err)) from None
    for key, per in (("CPU", eb.num_cpus), ("GPU", gpus)):
        if eb.actors * per > have.get(key, 0) + 1e-9:
            raise UsageError(f"edit_batch.actors={eb.actors} x num_{key.lower()}s={per} needs "
                             f"{eb.actors * per:g} {key}s; the Ray cluster has {have.get(key, 0):g}: "
                             "lower --actors or the per-actor resources")


def run_job(cfg: HfeditConfig, source: str | os.PathLike, out: str | os.PathLike,
            backbone: str = "models/backbone", split: Optional[str] = None,
            root: Optional[str] = None, pid_dir: str = "", progress: bool = True,
            start_ray: Callable[[], None] = lambda: None, executor: Executor = execute,
            remove_stale: bool = False) -> JobResult:
    """List, skip what is done, edit the rest on Ray Data (``executor``), write the manifest.
    ``start_ray`` is called only when there is work: a rerun with nothing left never starts Ray.
    Outputs of inputs deleted or now refused are listed (``stale``), deleted with
    ``remove_stale``."""
    loc = output_location(out)
    rectifiers = check_attributes(cfg.edit_batch.attributes, cfg.edit_batch.edits_dir)
    real_out = loc.local.resolve() if loc.local is not None else None
    store_prefix = loc.text.rstrip("/") + "/"

    def inside_out(path: str) -> bool:  # an output folder inside the input folder is not input
        if is_uri(path) or real_out is None:
            return path.startswith(store_prefix)
        real = resolved(path)  # a symlink loop resolves to nothing: not in --out
        return real is not None and real.is_relative_to(real_out)

    source = str(source)
    entries = [e for e in list_inputs(source, split, root)
               if split is not None or not inside_out(e.input)]
    folder = Location(source)
    ignored = [] if split is not None else [
        i for i in ignored_files(source) if not inside_out(folder.name(i))]
    if not entries:
        raise UsageError(f"--input {source}: no image files" + (
            f" (ignored, not images by their suffix: {ignored[:5]})" if ignored else ""))
    top = "" if split is not None or (is_uri(source) and not root) else \
        root or (source if Path(source).is_dir() else Path(source).parent)
    job = make_job(cfg, backbone, loc, rectifiers, split is not None, pid_dir, str(top))
    locked = _locked(loc.local, job.attributes) if loc.local is not None \
        else _store_locked(loc, job.run)
    with locked:
        reserve = _reserve_space(loc.local, len(entries) * len(job.attributes)) \
            if loc.local is not None else None
        out = loc
        done = DoneIndex(loc).refresh()
        items, standing = plan(entries, job, done, cfg.inversion.seed)
        got: list[pd.DataFrame] = []
        error, code, started = "", EXIT_OK, time.perf_counter()
        if items:
            from hfedit.progress import progress as progress_bar

            bar = progress_bar(total=len(items), unit="img", desc="edit_batch",
                               disable=not progress)
            stop = StopOnSignals()

            def on_batch(batch: pd.DataFrame) -> None:
                got.append(batch)
                bar.update(batch["id"].nunique())
                if stop.signum:  # a signal that Ray's iterator absorbed: stop at this batch
                    raise KeyboardInterrupt

            try:
                with stop:
                    if executor is execute:
                        # diffusers (and torch._dynamo, which reads the cwd when imported) before
                        # Ray: under `ray job submit`, Ray 2.60 unpacked the job's working dir
                        # again (rmtree + unzip, overwrite=True) as the job's workers started,
                        # and the driver's cwd, that folder, vanished under its next import
                        backbone_resolution(job.backbone)
                        start_ray()
                        stop.install()  # ray.init puts its own SIGTERM handler (sys.exit) first
                        _check_resources(cfg)
                    executor(items, job, cfg, on_batch, progress)
            except KeyboardInterrupt:
                error, code = stop.stopped()
            except UsageError:
                raise
            except Exception as err:  # noqa: BLE001 - still account for every input
                import traceback

                traceback.print_exc()  # the whole story on stderr; the manifest gets one line
                error, code = f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}", EXIT_CRASHED
            finally:
                bar.close()
        seconds = time.perf_counter() - started
        assembled = _assemble(entries, job, standing, got, done.refresh(), error)
        try:
            _write_manifest(assembled, out)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            if reserve is None:
                raise
            reserve.unlink(missing_ok=True)  # the space kept for this moment
            _write_manifest(assembled, out)
        manifest = read_manifest(loc.local or loc.text)  # what the user gets, typed as the file is
        stale = stale_outputs(out, entries, job.attributes, manifest)
        if reserve is not None:
            reserve.unlink(missing_ok=True)
        if not error:  # after a crash actors may still be writing: the next run tidies up
            with contextlib.suppress(OSError):  # (a full disk: the logs stay as they are)
                _compact_logs(out, done)
            if loc.local is not None:
                _remove_temporaries(loc.local, job.attributes)
            if remove_stale:
                for rel in stale:
                    out.delete(rel)
    counts = count(manifest, job.run, len(items))
    counts["stale"] = len(stale)
    if code == EXIT_OK and counts["failed"]:
        code = EXIT_FAILED
    result = JobResult(manifest, counts, code, job.run, seconds, error=error, ignored=ignored,
                       stale=stale, stale_removed=remove_stale and not error)
    result.table, result.summary = summary_table(manifest, job.run), summary_line(result, out)
    return result


def _assemble(entries: list[Entry], job: Job, standing: list[dict], got: list[pd.DataFrame],
              done: DoneIndex, error: str) -> pd.DataFrame:
    """Exactly one row per (input, attribute): this run's result, else the logged one (an
    actor's work whose batch never came back), else the standing one, else not_processed."""
    rows = {(r["id"], r["attribute"]): r for r in standing}
    for (key, row) in done.rows.items():
        if row.get("run") == job.run:
            rows[key] = row
    for batch in got:
        for row in map(from_wire, batch.to_dict("records")):
            rows[(row["id"], row["attribute"])] = row
    out = []
    for e in entries:
        for a in job.attributes:
            row = rows.get((e.id, a))
            if row is None:
                why = RuntimeError(error or "the job ended before this image was processed")
                row = error_row({"id": e.id, "attribute": a, "input": e.input, "run": job.run,
                              "seed": image_seed(job.inversion.seed, e.id), "signature": e.signature,
                              "fingerprint": job.fingerprints[a]}, NOT_PROCESSED, why)
            out.append(to_display({c: row.get(c) for c in COLUMNS}))
    df = pd.DataFrame(out, columns=COLUMNS)
    for col in ("l1", "ssim", "max_error", "decode_s", "invert_s", "edit_s", "write_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("reason", "message", "output"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    df["seed"] = df["seed"].astype("int64")
    df["worker_pid"] = pd.to_numeric(df["worker_pid"], errors="coerce").astype("Int64")
    return df


# ------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True,
                   help="folder (recursive), list file, or prepared dataset (with --split)")
    p.add_argument("--out", required=True,
                   help="<out>/<attribute>/<id>.png + manifest.parquet: a folder or a store prefix "
                   "(s3://bucket/out)")
    p.add_argument("--split", choices=SPLITS, help="edit this split of the prepared dataset --input")
    p.add_argument("--root", help="list file: paths are relative to, and must stay inside, this folder")
    p.add_argument("--backbone", default=BACKBONE_DEFAULT,
                   help="backbone folder, hub id, or models:/<registered hfedit model> (its backbone)")
    p.add_argument("--attributes", nargs="+", help="reconstruction and/or edits (edit_batch.attributes)")
    p.add_argument("--edits", help="edit rectifiers <edits>/<attribute>/ (edit_batch.edits_dir), or "
                   "models:/hfedit-edit-<attribute>@<alias> (fetched into <out>/_models/)")
    p.add_argument("--actors", type=int, help="Ray Data actors (edit_batch.actors)")
    p.add_argument("--batch-size", type=int, help="images per actor call (edit_batch.batch_size)")
    p.add_argument("--num-cpus", type=float, help="CPUs per actor (edit_batch.num_cpus)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (edit_batch.num_gpus)")
    p.add_argument("--steps", type=int, help="inversion steps N (inversion.num_steps)")
    p.add_argument("--mode", choices=["edit_friendly", "ddim"],
                   help="edit-friendly replay or DDIM inversion + sampling (inversion.mode)")
    p.add_argument("--metrics", type=Path, help="also write the counts and mean metrics here (JSON)")
    p.add_argument("--pid-dir", default="", help="actors write <pid>.pid here")
    p.add_argument("--allow-failed", action="store_true",
                   help="exit 0 even when some inputs failed (they are listed in the manifest)")
    p.add_argument("--remove-stale", action="store_true",
                   help="delete outputs whose input was deleted or is now refused (listed otherwise)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> HfeditConfig:
    sets = list(args.overrides)
    flags = {"edits_dir": args.edits, "actors": args.actors, "batch_size": args.batch_size,
             "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    sets += [f"edit_batch.{k}={v}" for k, v in flags.items() if v is not None]
    if args.attributes:
        sets.append(f"edit_batch.attributes=[{','.join(args.attributes)}]")
    if args.steps is not None:
        sets.append(f"inversion.num_steps={args.steps}")
    if args.mode is not None:
        sets.append(f"inversion.mode={args.mode}")
    return load_config(overrides=sets)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        resolve_model_uris(args)
    except UsageError as err:
        print(f"edit_batch: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - a registry that cannot be read: say which URI
        print(f"edit_batch: --edits {args.edits} / --backbone {args.backbone}: cannot fetch the "
              f"model ({type(err).__name__}: {err}); is MLFLOW_TRACKING_URI the store that "
              "holds it?", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"edit_batch: {err}", file=sys.stderr)
        return EXIT_USAGE

    from pipelines.tracking import uploaded_copy

    for flag, value in (("--backbone", args.backbone), ("--edits", args.edits)):
        if value and not is_uri(value) and not Path(value).is_absolute() and not Path(value).exists() \
                and uploaded_copy(Path.cwd()):
            print(f"edit_batch: {flag} {value}: not in the uploaded working directory "
                  f"{Path.cwd()} (ray job submit uploads no git-ignored folder such as models/): "
                  "give an absolute path on storage every node sees", file=sys.stderr)
            return EXIT_USAGE

    def start_ray() -> None:
        from pipelines.ray_runtime import init_ray

        init_ray(cfg)

    def go() -> JobResult:
        return run_job(cfg, args.input, args.out, args.backbone, args.split, args.root,
                       args.pid_dir, not args.no_progress, start_ray,
                       remove_stale=args.remove_stale)

    try:
        if args.no_track:
            result = go()
        else:
            from pipelines.tracking import flatten, stage_run

            with stage_run(cfg, "edit_batch", tags={"edit_batch.input": args.input},
                           store_beside=None if is_uri(args.out) else Path(args.out)) as tracker:
                result = go()
                flat = {f"edit_batch/{k}": v for k, v in flatten(metrics_dict(result)).items()
                        if isinstance(v, (int, float))}
                tracker.log_metrics(flat, step=0)
                log_manifest(tracker, args.out)
                tracker.log_text(result.table + "\n" + result.summary + "\n", "summary.txt")
    except UsageError as err:
        print(f"edit_batch: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.metrics:  # the headline numbers, and beside them all of them (without wall times)
        from pipelines.tracking import write_metrics

        write_metrics(args.metrics, metrics_dict(result), "edit_batch")
    print(result.table)
    print(result.summary, flush=True)
    return EXIT_OK if result.exit_code == EXIT_FAILED and args.allow_failed else result.exit_code


if __name__ == "__main__":
    # Run as the importable module, so actors unpickle pipelines.batch_actor.EditImages by name.
    from pipelines.edit_batch import main as _main
    from pipelines.entry import run_main

    run_main("edit_batch", _main, uri_flags=("--input", "--out", "--root", "--backbone", "--edits"))
