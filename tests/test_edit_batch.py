"""Batch editing on Ray Data (pipelines/edit_batch.py): every input edited or listed with its
reason, reruns that do no work, a killed actor, outputs independent of concurrency, an
interrupted run finished by a rerun, and `ray job submit` against a real head node."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hfedit.models.backbone import save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.config import RectifierConfig, RectifierTrunk, load_config
from hfedit.data.images import load_image, to_tensor
from hfedit.models.rectifier import build_rectifier
from pipelines import edit_batch as eb
from tests.conftest import perturbed
from tests.test_data import folder  # noqa: F401 - real faces, odd modes, broken files, bad links

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
ATTRS = ["reconstruction", "smiling"]
LISTING_REASONS = {"outside_root", "broken_link", "not_a_file"}  # refused before Ray


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(random_denoiser, tmp_path_factory) -> tuple[Path, Path]:
    """(backbone folder, edits folder with a 'smiling' rectifier whose heads are perturbed: an
    untrained rectifier is the identity)."""
    base = tmp_path_factory.mktemp("models")
    save_backbone(random_denoiser, base / "backbone")
    torch.manual_seed(0)
    rect = perturbed(build_rectifier(RectifierConfig(trunk=RectifierTrunk.resnet18,
                                                     branch_channels=16, time_embed_dim=32),
                                     random_denoiser.unet), scale=0.05)
    save_rectifier(base / "edits" / "smiling", rect)
    return base / "backbone", base / "edits"


def _cfg(edits: Path, *sets: str):
    return load_config(overrides=[f"inversion.num_steps={STEPS}", f"edit_batch.edits_dir={edits}",
                                  f"edit_batch.attributes=[{','.join(ATTRS)}]", *sets])


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray (own temp dir, 2 CPUs) that ray.shutdown() stops; nobody else's.
    Started as the pipelines start it: retried once when a loaded machine makes it time out."""
    import ray

    from pipelines.ray_runtime import start_local_ray

    temp = tempfile.mkdtemp(prefix="rayeb", dir="/tmp")  # short: Unix socket paths are limited
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only cluster; no token file
    start_local_ray(2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                    runtime_env={"env_vars": {"HFEDIT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _scanned(folder) -> tuple[Path, dict[str, str]]:  # noqa: F811
    """(root, id -> expected reason) of the folder as a job scans it: files that are not images
    by their suffix (bad/notes.txt) are ignored, not inputs."""
    root, expected = folder
    return root, {i: r for i, r in expected.items() if eb.is_image_name(i) or r in LISTING_REASONS}


def _run(cfg, source, out, backbone, **kw) -> eb.JobResult:
    return eb.run_job(cfg, source, out, str(backbone), progress=False, **kw)


@pytest.fixture(scope="module")
def first_run(folder, models, ray_cluster, tmp_path_factory):  # noqa: F811
    root, _ = folder
    backbone, edits = models
    out = tmp_path_factory.mktemp("first") / "out"
    cfg = _cfg(edits, "edit_batch.actors=2", "edit_batch.batch_size=2")
    return out, _run(cfg, root, out, backbone)


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _assert_accounted(result: eb.JobResult, expected: dict[str, str], out: Path) -> None:
    """Exactly one row per (input, attribute); ok rows have a complete PNG, the others the
    reason the input deserves."""
    df = result.manifest
    assert sorted(zip(df.id, df.attribute)) == sorted((i, a) for i in expected for a in ATTRS)
    for row in df.itertuples():
        if expected[row.id] == "ok":
            assert row.status == "ok", (row.id, row.reason, row.message)
            with Image.open(out / row.output) as img:
                img.load()  # a complete PNG
                assert img.size == (32, 32) and img.mode == "RGB"
        else:
            assert (row.status, row.reason) == ("error", expected[row.id]), row
            assert pd.isna(row.output) and row.id.split("/")[-1] in row.message


# ------------------------------------------------------------------------- no Ray needed
def test_seeds_and_output_names_depend_on_the_id_alone():
    assert eb.image_seed(0, "faces/a.png") == eb.image_seed(0, "faces/a.png") == 7292052230631365485
    assert len({eb.image_seed(0, "a"), eb.image_seed(1, "a"), eb.image_seed(0, "b")}) == 3
    # no double extensions: the suffix becomes .png, unless two inputs would share a name
    assert eb.output_names(["faces/a.jpg", "faces/b.png", "c"]) == {
        "faces/a.jpg": "faces/a.png", "faces/b.png": "faces/b.png", "c": "c.png"}
    assert eb.output_names(["a.png", "a.jpg", "b.jpg", "b.jpeg"]) == {
        "a.png": "a.png", "a.jpg": "a.jpg.png", "b.jpg": "b.jpg.png", "b.jpeg": "b.jpeg.png"}
    # a name still taken is left out (list_inputs refuses it: name_collision), not the whole job
    assert eb.output_names(["x.jpg", "x.jpg.png", "x.png"]) == {"x.jpg.png": "x.jpg.png",
                                                                "x.png": "x.png"}
    assert eb.output_relpath("smiling", "faces/a.png") == "smiling/faces/a.png"
    with pytest.raises(ValueError, match="relative path"):
        eb.output_relpath("smiling", "../escape.png")


def test_a_copied_project_has_the_same_input_signatures(tmp_path):
    """Skips are by content: a copy (new mtimes, another path) of a folder or of a prepared
    split signs every input as the original does; a changed byte changes its signature."""
    from pipelines.batch_job import list_inputs
    from tests.conftest import prepared_faces

    src = tmp_path / "a" / "photos"
    src.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f"p{i}.png")
    prepared = prepared_faces(tmp_path / "a" / "prepared", 6)
    time.sleep(0.01)
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy, copy_function=shutil.copy)  # mtimes not kept
    for original, copied in ((list_inputs(src), list_inputs(copy / "photos")),
                             (list_inputs(prepared, split="val"),
                              list_inputs(copy / "prepared", split="val"))):
        assert [e.id for e in original] == [e.id for e in copied] and original
        assert [e.signature for e in original] == [e.signature for e in copied]
    assert {e.input for e in list_inputs(copy / "photos")}.isdisjoint(
        {e.input for e in list_inputs(src)})
    with open(copy / "photos" / "p1.png", "ab") as f:
        f.write(b"\0")
    changed = {e.id: e.signature for e in list_inputs(copy / "photos")}
    assert changed["p1.png"] != {e.id: e.signature for e in list_inputs(src)}["p1.png"]


def test_list_file_refuses_paths_that_leave_the_root(folder, tmp_path):  # noqa: F811
    root, expected = folder
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(["# faces", "faces/astronaut.png", str(root / "faces/lfw_0.png"),
                                  "faces/astronaut.png", "../secret.png", "bad/outside.png",
                                  "bad/dangling.png", "faces", "missing.png", ""]))
    got = {e.id: e.error.reason if e.error else "ok" for e in eb.list_inputs(listing, root=root)}
    assert got == {"faces/astronaut.png": "ok", "faces/lfw_0.png": "ok", "../secret.png": "outside_root",
                   "bad/outside.png": "outside_root", "bad/dangling.png": "broken_link",
                   "faces": "not_a_file", "missing.png": "not_a_file"}
    by_folder = {e.id: e.error.reason for e in eb.list_inputs(root) if e.error}
    assert by_folder == {i: r for i, r in expected.items() if r in LISTING_REASONS}


def test_a_missing_edit_rectifier_fails_fast_naming_it(folder, models, tmp_path, capsys):  # noqa: F811
    root, _ = folder
    backbone, edits = models
    with pytest.raises(eb.UsageError, match=r"attribute 'old': no edit rectifier in .*edits/old"):
        _run(_cfg(edits, "edit_batch.attributes=[reconstruction,old]"), root, tmp_path / "o", backbone)
    code = eb.main(["--input", str(root), "--out", str(tmp_path / "o"), "--backbone", str(backbone),
                    "--edits", str(edits), "--attributes", "reconstruction", "old", "--no-track"])
    assert code == eb.EXIT_USAGE and "'old'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.parquet").exists()


def test_relative_model_folders_in_an_uploaded_copy_are_refused_with_the_fix(folder, tmp_path,
                                                                             monkeypatch, capsys):  # noqa: F811
    """Under `ray job submit` the job runs in Ray's copy of the working directory, without
    the git-ignored models/: a relative --backbone there is named with the fix."""
    root, _ = folder
    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("HFEDIT_ROOT", str(ROOT))
    code = eb.main(["--input", str(root), "--out", str(tmp_path / "o"), "--backbone",
                    "models/backbone", "--attributes", "reconstruction", "--no-track"])
    assert code == eb.EXIT_USAGE
    assert "--backbone models/backbone: not in the uploaded working directory" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prepared_split_in_a_plain_loop_reconstructs_exactly(folder, models, tmp_path):  # noqa: F811
    from hfedit.config import DataConfig
    from hfedit.data.prepared import load_split, prepare_dataset

    root, _ = folder
    backbone, edits = models
    prepare_dataset(DataConfig(source=str(root), resolution=32), tmp_path / "prep", progress=False)
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]")
    result = _run(cfg, tmp_path / "prep", tmp_path / "out", backbone, split="val",
                  executor=eb.execute_plain)
    val = load_split(tmp_path / "prep", "val")
    df = result.manifest
    assert result.exit_code == 0 and len(df) == val.shape[0] and (df.status == "ok").all()
    assert df.max_error.max() < 1e-4  # edit-friendly inversion: the input back
    for row in df.itertuples():
        png = np.asarray(Image.open(tmp_path / "out" / row.output), dtype=np.int16)
        src = ((val[int(row.input.rsplit("#", 1)[1])] + 1) * 127.5).round().permute(1, 2, 0).numpy()
        assert np.abs(png - src).max() <= 1


def test_the_decode_stage_turns_each_input_into_its_image_or_its_reason(folder, models, tmp_path):  # noqa: F811
    """Stage 1 (CPU tasks) alone: a good file becomes the prepare stage's tensor, a bad one its
    reason with zeros in place of the image, and nothing reaches the model for it."""
    from pipelines.batch_actor import columns, decode_images

    root, expected = folder
    backbone, edits = models
    job = eb.make_job(_cfg(edits), str(backbone), tmp_path / "o", eb.check_attributes(ATTRS, edits),
                      split_input=False)
    ids = ["faces/astronaut.jpg", "bad/truncated.png", "bad/notes.txt", "odd/cmyk.jpg"]
    items = [{"id": i, "input": str(root / i), "signature": "", "index": -1, "seed": 7,
              "pending": ",".join(ATTRS), "name": i} for i in ids]
    out = decode_images(columns(items, list(items[0])), job, eb.backbone_resolution(str(backbone)))
    assert list(out["id"]) == ids and out["x0"].shape == (4, 3, 32, 32)
    for k, id_ in enumerate(ids):
        if expected[id_] == "ok":
            ref = to_tensor(load_image(root / id_, 10**8).image, 32)
            assert out["reason"][k] == "" and np.array_equal(out["x0"][k], ref.numpy())
        else:
            assert out["reason"][k] == expected[id_] and id_.split("/")[-1] in out["message"][k]
            assert not out["x0"][k].any()
    rows = eb.EditImages(job)(out)  # the model stage passes the refused ones through as errors
    by = {(r, a): (s, w) for r, a, s, w in zip(rows["id"], rows["attribute"], rows["status"], rows["write"])}
    assert by[("bad/truncated.png", "smiling")] == ("error", False)
    assert by[("faces/astronaut.jpg", "smiling")] == (None, True)


def test_an_output_folder_inside_the_input_is_not_read_back(folder, models, tmp_path):  # noqa: F811
    root, _ = folder
    backbone, edits = models
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(root / "faces/lfw_0.png", photos / "a.png")
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]")
    for _ in range(2):
        result = _run(cfg, photos, photos / "edited", backbone, executor=eb.execute_plain)
        assert result.manifest.id.tolist() == ["a.png"] and result.exit_code == 0


def test_a_job_removes_its_own_temporaries_and_no_user_file(folder, models, tmp_path):  # noqa: F811
    """Every `.*.tmp` anywhere under --out used to be deleted."""
    from hfedit import files

    root, _ = folder
    backbone, edits = models
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    shutil.copy(root / "faces/lfw_0.png", photos / "a.png")
    users = [out / ".notes.tmp", out / "reconstruction" / ".draft.png.tmp", out / "mine" / ".x.tmp"]
    leftovers = [files._sibling(out / "manifest.parquet"),  # writers killed before their rename
                 files._sibling(out / "reconstruction" / "a.png")]
    for p in users + leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("kept" if p in users else "partial")
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]")
    result = _run(cfg, photos, out, backbone, executor=eb.execute_plain)
    assert result.exit_code == 0 and (out / "reconstruction/a.png").is_file()
    assert [p.read_text() for p in users] == ["kept"] * 3
    assert not any(p.exists() for p in leftovers)


def _odd_names(root: Path, photos: Path) -> str:
    """photos/ with a.png and a file whose name is not UTF-8 (byte 0xFF); returns that name."""
    odd = os.fsdecode(b"\xff-photo.png")
    photos.mkdir()
    for name in ("a.png", odd):
        shutil.copy(root / "faces/lfw_0.png", photos / name)
    return odd


def _assert_odd_name_edited(result: eb.JobResult, out: Path, odd: str) -> None:
    df = result.manifest.set_index("id")
    assert result.exit_code == 0 and sorted(df.index) == ["\\xff-photo.png", "a.png"]
    assert df.loc["\\xff-photo.png", "seed"] == eb.image_seed(0, odd)  # from the name's bytes
    assert (out / "reconstruction" / odd).is_file()
    assert df.loc["\\xff-photo.png", "output"] == "reconstruction/\\xff-photo.png"


def test_a_file_name_that_is_not_utf8_does_not_stop_the_job(folder, models, tmp_path):  # noqa: F811
    root, _ = folder
    backbone, edits = models
    odd = _odd_names(root, tmp_path / "photos")
    assert eb.image_seed(0, "a.png") == eb.image_seed(0, "a.png".encode().decode())
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]")
    result = _run(cfg, tmp_path / "photos", tmp_path / "out", backbone, executor=eb.execute_plain)
    _assert_odd_name_edited(result, tmp_path / "out", odd)
    listing = tmp_path / "photos.txt"  # a list file naming it by its bytes
    listing.write_bytes(b"photos/a.png\nphotos/\xff-photo.png\n")
    assert [e.id for e in eb.list_inputs(listing)] == ["photos/a.png", f"photos/{odd}"]


def test_sigterm_stops_the_job_with_its_manifest(folder, models, tmp_path):  # noqa: F811
    """SIGTERM (what `ray job stop` sends) used to end the driver without manifest or summary;
    now it is handled like Ctrl-C: the job stops, lists what was not done, exits 143."""
    root, _ = folder
    backbone, edits = models
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(root / "faces/lfw_0.png", photos / name)

    def sigterm_after_one_image(items, job, cfg, on_batch, progress):
        eb.execute_plain(items[:1], job, cfg, on_batch, progress)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the job's handler
        eb.execute_plain(items[1:], job, cfg, on_batch, progress)

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the default handler: the job would have died")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]", "edit_batch.batch_size=1")
        result = _run(cfg, photos, tmp_path / "out", backbone, executor=sigterm_after_one_image)
    finally:
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the job restored it
        signal.signal(signal.SIGTERM, previous)
    assert (result.exit_code, result.error) == (143, "interrupted (SIGTERM)")
    on_disk = eb.read_manifest(tmp_path / "out").set_index("id")
    assert on_disk.status.to_dict() == {"a.png": "ok", "b.png": "error", "c.png": "error"}
    assert set(on_disk.reason.dropna()) == {eb.NOT_PROCESSED}
    assert "stopped: interrupted (SIGTERM)" in result.summary


@pytest.mark.parametrize("extra, says", [
    (["--steps", "0"], "inversion.num_steps=0 must be at least 1 (set by --steps"),
    (["--steps", "-3"], "inversion.num_steps=-3 must be at least 1"),
    (["--actors", "0"], "edit_batch.actors=0 must be at least 1 (set by --actors"),
    (["--batch-size", "0"], "edit_batch.batch_size=0 must be at least 1"),
    (["--input", "{root}/faces/astronaut.png"], "astronaut.png is an image (PNG), not a folder or a list file"),
    (["--out", "{root}/faces/astronaut.png"], "astronaut.png is a file, not a folder"),
], ids=["steps 0", "steps -3", "actors 0", "batch 0", "input is an image", "out is a file"])
def test_bad_arguments_fail_before_ray_with_the_fix(folder, models, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                    extra, says):
    """--steps 0 used to start Ray and fail every image after ~100 s; an image given as --input
    or a file as --out ended in tracebacks."""
    import pipelines.ray_runtime

    root, _ = folder
    backbone, edits = models

    def no_ray(*args, **kwargs):
        raise AssertionError("bad arguments must be refused before Ray starts")

    monkeypatch.setattr(pipelines.ray_runtime, "init_ray", no_ray)
    args = ["--input", str(root), "--out", str(tmp_path / "out"), "--backbone", str(backbone),
            "--edits", str(edits), "--attributes", "reconstruction", "--no-track"]
    args += [e.format(root=root) for e in extra]
    assert eb.main(args) == eb.EXIT_USAGE
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- on Ray
@pytest.mark.timeout(900)  # the module fixtures run a Ray Data job in setup: minutes under load
def test_every_input_is_edited_or_listed_with_its_reason(folder, first_run):  # noqa: F811
    root, expected = _scanned(folder)
    out, result = first_run
    _assert_accounted(result, expected, out)
    # a file that is not an image by its suffix is not an input: ignored and said so, not failed
    assert result.ignored == ["bad/notes.txt"] and "1 other files ignored" in result.summary
    n_ok = sum(v == "ok" for v in expected.values())
    assert result.counts["edited"] == result.counts["edited_now"] == n_ok
    assert result.counts["failed"] == len(expected) - n_ok and result.exit_code == eb.EXIT_FAILED
    assert f"{n_ok} edited" in result.summary and f"{len(expected) - n_ok} failed" in result.summary
    assert "truncated" in result.table and "smiling" in result.table
    df = result.manifest[result.manifest.status == "ok"]
    rec, smile = (df[df.attribute == a].set_index("id") for a in ATTRS)
    assert rec.max_error.max() < 1e-4 and smile.max_error.isna().all()
    assert (smile.l1 > rec.l1 + 1e-3).all()  # the rectifier changed the images
    assert df.seed.tolist() == [eb.image_seed(0, i) for i in df.id]
    # The reconstruction is the input prepared exactly as the prepare stage does.
    src = to_tensor(load_image(root / "faces/astronaut.jpg", 10**8).image, 32)
    png = np.asarray(Image.open(out / rec.loc["faces/astronaut.jpg", "output"]), dtype=np.int16)
    assert np.abs(png - ((src + 1) * 127.5).round().permute(1, 2, 0).numpy()).max() <= 1
    assert not list(out.rglob("*.tmp"))


@pytest.mark.timeout(900)  # the module fixtures run a Ray Data job in setup: minutes under load
def test_a_file_name_that_is_not_utf8_crosses_ray(folder, models, ray_cluster, tmp_path):  # noqa: F811
    """Arrow strings must be UTF-8: names cross Ray Data as their bytes."""
    root, _ = folder
    backbone, edits = models
    odd = _odd_names(root, tmp_path / "photos")
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]", "edit_batch.actors=1")
    result = _run(cfg, tmp_path / "photos", tmp_path / "out", backbone)
    _assert_odd_name_edited(result, tmp_path / "out", odd)


@pytest.mark.timeout(900)  # the module fixtures run a Ray Data job in setup: minutes under load
def test_a_rerun_does_no_work(folder, models, first_run):  # noqa: F811
    root, expected = _scanned(folder)
    out, first = first_run
    backbone, edits = models
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    def no_ray():
        raise AssertionError("a rerun with nothing left must not start Ray")

    again = _run(_cfg(edits), root, out, backbone, start_ray=no_ray)
    assert again.counts["scheduled"] == 0 and again.counts["edited_now"] == 0
    assert again.counts["edited_before"] == first.counts["edited"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    _assert_accounted(again, expected, out)


def _png_arrays(out: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(Image.open(out / k), dtype=np.int16) for k in _pngs(out)}


@pytest.mark.timeout(900)  # the module fixtures run a Ray Data job in setup: minutes under load
@pytest.mark.parametrize("how", ["plain loop", pytest.param("1 actor", marks=pytest.mark.slow)])
def test_same_batches_give_identical_pngs_other_batch_sizes_agree(folder, models, first_run,
                                                                 tmp_path, how):  # noqa: F811
    """The determinism contract. first_run: 2 actors, batches of 2. The same batch size in
    one process without Ray (or one actor): identical PNG bytes. Batches of 3: the edits
    agree within 1e-5 before quantisation, so a pixel moves by at most one 8-bit level and the
    metrics agree within 1e-5."""
    root, _ = folder
    out, first = first_run
    backbone, edits = models
    executor = eb.execute_plain if how.startswith("plain") else eb.execute
    same = _run(_cfg(edits, "edit_batch.actors=1", "edit_batch.batch_size=2"), root,
                tmp_path / "same", backbone, executor=executor)
    assert _pngs(tmp_path / "same") == _pngs(out) and len(_pngs(out)) > 0
    cols = ["id", "attribute", "status", "reason", "output", "seed", "l1", "ssim", "max_error"]
    pd.testing.assert_frame_equal(same.manifest[cols], first.manifest[cols])
    assert set(first.manifest.worker_pid.dropna()) != set(same.manifest.worker_pid.dropna())
    other = _run(_cfg(edits, "edit_batch.actors=1", "edit_batch.batch_size=3"), root,
                 tmp_path / "other", backbone, executor=executor)
    a, b = _png_arrays(tmp_path / "other"), _png_arrays(out)
    assert a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)
    exact = ["id", "attribute", "status", "reason", "output", "seed"]
    pd.testing.assert_frame_equal(other.manifest[exact], first.manifest[exact])
    for col in ("l1", "ssim"):
        np.testing.assert_allclose(other.manifest[col], first.manifest[col], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixtures run a Ray Data job in setup: minutes under load
def test_a_killed_actor_is_restarted_and_every_image_accounted(folder, models, ray_cluster, tmp_path):  # noqa: F811
    root, expected = _scanned(folder)
    backbone, edits = models
    out, pids = tmp_path / "out", tmp_path / "pids"
    cfg = _cfg(edits, "edit_batch.actors=1", "edit_batch.batch_size=4", "inversion.num_steps=12")
    killed: dict[str, float] = {}

    def kill_the_actor_mid_job():
        deadline = time.time() + 200
        while time.time() < deadline:
            logs = list((out / eb.LOG_DIR).glob("2*.jsonl"))
            if logs and any(p.stat().st_size for p in logs) and list(pids.glob("*.pid")):
                pid = int(next(pids.glob("*.pid")).read_text())
                killed["at"] = time.time()
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    threading.Thread(target=kill_the_actor_mid_job, daemon=True).start()
    result = _run(cfg, root, out, backbone, pid_dir=str(pids))
    assert "pid" in killed, "the actor finished before it could be killed"
    assert len(list(pids.glob("*.pid"))) >= 2  # Ray started a replacement
    _assert_accounted(result, expected, out)
    df = result.manifest[result.manifest.status == "ok"]
    assert set(df.worker_pid) - {killed["pid"]}  # the replacement did the rest ...
    for row in df[df.worker_pid == killed["pid"]].itertuples():  # ... and redid nothing
        assert (out / row.output).stat().st_mtime < killed["at"]
