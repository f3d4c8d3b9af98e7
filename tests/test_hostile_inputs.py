"""Hostile and unlucky inputs to edit_batch and the CLI (issue 24): symlink loops, names too
long for their temporaries or outputs, an output that is both a file and a folder, an input
swapped for a link after listing, truncated outputs and torn done-log lines on resume, stale
outputs. Each edits one tiny face in a plain loop (no Ray)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipelines import edit_batch as eb
from tests.test_edit_batch import _cfg, _run, models  # noqa: F401 - tiny backbone + rectifier
from tests.test_data import folder  # noqa: F401 - real faces


def _photos(folder, tmp_path: Path, *names: str) -> Path:  # noqa: F811
    root, _ = folder
    photos = tmp_path / "photos"
    for name in names:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "faces/lfw_0.png", photos / name)
    return photos


def _job(models, photos, out, *sets, **kw) -> eb.JobResult:  # noqa: F811
    backbone, edits = models
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]", *sets)
    return _run(cfg, photos, out, backbone, **{"executor": eb.execute_plain, **kw})


def _reasons(result: eb.JobResult) -> dict[str, str]:
    return dict(zip(result.manifest.id, result.manifest.reason.fillna("ok")))


def test_a_symlink_loop_is_refused_and_the_job_completes(folder, models, tmp_path):  # noqa: F811
    """`Path.resolve()` raised RuntimeError on the loop: exit 1, no manifest."""
    photos = _photos(folder, tmp_path, "a.png")
    os.symlink("loop.png", photos / "loop.png")
    os.symlink("b.png", photos / "c.png")
    os.symlink("c.png", photos / "b.png")
    result = _job(models, photos, tmp_path / "out")
    assert _reasons(result) == {"a.png": "ok", "b.png": "broken_link", "c.png": "broken_link",
                                "loop.png": "broken_link"}
    assert result.exit_code == eb.EXIT_FAILED and (tmp_path / "out/manifest.parquet").is_file()
    listed = tmp_path / "list.txt"
    listed.write_text("a.png\nloop.png\n")
    result = _job(models, listed, tmp_path / "out2", root=str(photos))
    assert _reasons(result) == {"a.png": "ok", "loop.png": "broken_link"}


def test_long_names_are_written_or_refused_up_front(folder, models, tmp_path):  # noqa: F811
    """A 240-byte name failed at write time (the temporary's name was over 255 bytes) and was
    retried on every rerun; a name whose output is over 255 bytes is refused while listing."""
    fits, over = "a" * 247 + ".png", "b" * 250 + ".jpg"  # over.png fits, over's .jpg.png would not
    photos = _photos(folder, tmp_path, fits, over, "b" * 250 + ".png")
    result = _job(models, photos, tmp_path / "out")
    reasons = _reasons(result)
    assert reasons[fits] == "ok" and (tmp_path / "out/reconstruction" / fits).is_file()
    assert reasons[over] == "name_too_long" and "255 bytes" in result.manifest.set_index("id").loc[
        over, "message"]
    again = _job(models, photos, tmp_path / "out")
    assert again.counts["scheduled"] == 0 and _reasons(again) == reasons  # not retried


def test_the_cli_refuses_an_output_name_too_long_before_the_model(tmp_path, random_denoiser,
                                                                  capsys, monkeypatch):
    from hfedit import cli
    from hfedit.models import backbone

    image = tmp_path / ("c" * 240 + ".png")
    Image.new("RGB", (32, 32), (200, 100, 50)).save(image)
    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(["reconstruct", str(image), "--backbone", str(tmp_path / "none"),
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "255 bytes" in err and not (tmp_path / "out").exists()


def test_the_manifest_says_what_each_decode_proved_and_require_verified_refuses(  # noqa: F811
        folder, models, tmp_path):
    """A damaged WebP was edited into garbage with nothing in the manifest to say so."""
    from tests.test_data import damaged_webp

    photos = _photos(folder, tmp_path, "a.png")
    Image.open(photos / "a.png").convert("RGB").save(photos / "b.jpg", quality=95)
    (photos / "c.webp").write_bytes(damaged_webp())
    result = _job(models, photos, tmp_path / "out")
    assert _reasons(result) == {"a.png": "ok", "b.jpg": "ok", "c.webp": "ok"}
    assert dict(zip(result.manifest.id, result.manifest.integrity)) == {
        "a.png": "checksum", "b.jpg": "structure", "c.webp": "unverified"}
    strict = _job(models, photos, tmp_path / "out", "data.require_verified=true")
    assert _reasons(strict) == {"a.png": "ok", "b.jpg": "ok", "c.webp": "unverified"}
    message = strict.manifest.set_index("id").loc["c.webp", "message"]
    assert "c.webp" in message and "data.require_verified" in message
    # turning the setting on redid the batch: the WebP edited before is not left counted as done
    assert strict.counts["scheduled"] == 3 and strict.exit_code == eb.EXIT_FAILED


def test_a_file_beside_a_folder_of_its_output_name_gets_another_name(folder, models, tmp_path):  # noqa: F811
    """`x.jpg` beside a folder `x.png/`: `reconstruction/x.png` was both, a permanent edit_failed."""
    photos = _photos(folder, tmp_path, "x.png/a.png")
    Image.open(photos / "x.png/a.png").save(photos / "x.jpg", quality=95)
    result = _job(models, photos, tmp_path / "out")
    assert result.exit_code == 0 and _reasons(result) == {"x.jpg": "ok", "x.png/a.png": "ok"}
    assert dict(zip(result.manifest.id, result.manifest.output)) == {
        "x.jpg": "reconstruction/x.jpg.png", "x.png/a.png": "reconstruction/x.png/a.png"}


def test_an_input_swapped_for_a_link_after_listing_is_not_read(folder, models, tmp_path):  # noqa: F811
    """Listing validated links, decoding reopened the path and followed them: a link to a file
    outside the root was edited (its output equal to the outside image)."""
    photos = _photos(folder, tmp_path, "a.png", "b.png")
    outside = tmp_path / "secret.png"
    shutil.copy(photos / "a.png", outside)

    def swap_then_run(items, job, cfg, on_batch, progress):
        (photos / "a.png").unlink()
        os.symlink(outside, photos / "a.png")
        eb.execute_plain(items, job, cfg, on_batch, progress)

    result = _job(models, photos, tmp_path / "out", executor=swap_then_run)
    assert _reasons(result) == {"a.png": "outside_root", "b.png": "ok"}
    assert not (tmp_path / "out/reconstruction/a.png").exists()


@pytest.mark.parametrize("size", [0, 100])
def test_a_truncated_output_is_redone_on_resume(folder, models, tmp_path, size):  # noqa: F811
    """Resume counted an output truncated to 0 or 100 bytes as done."""
    photos = _photos(folder, tmp_path, "a.png", "b.png")
    out = tmp_path / "out"
    _job(models, photos, out)
    png = out / "reconstruction/a.png"
    whole = png.read_bytes()
    with open(png, "r+b") as f:
        f.truncate(size)
    again = _job(models, photos, out)
    assert again.counts["scheduled"] == 1 and again.counts["edited_now"] == 1
    assert png.read_bytes() == whole


def test_a_garbled_or_torn_done_log_line_is_ignored(folder, models, tmp_path):  # noqa: F811
    """Lines carry a checksum: a line whose bytes changed (a full disk, a torn append) counts as
    never written, and the image is redone rather than trusted or crashing the job."""
    photos = _photos(folder, tmp_path, "a.png", "b.png")
    out = tmp_path / "out"
    _job(models, photos, out)
    log = out / "_log" / eb.COMPACTED
    lines = log.read_bytes().splitlines(keepends=True)
    assert all(b'"crc": "' in line for line in lines)
    garbled = lines[0].replace(b'"status": "ok"', b'"status": "ko"')
    log.write_bytes(garbled + b"".join(lines[1:]) + lines[1][:40])  # and a torn last line
    again = _job(models, photos, out)
    assert again.exit_code == 0 and again.counts["scheduled"] == 1


def test_prepare_puts_copies_and_links_of_an_image_in_one_split(tmp_path):
    """A copy and a link of a training image were split by their ids, into val too."""
    import json

    import numpy as np
    import pyarrow.dataset as pds

    from hfedit.config import DataConfig
    from hfedit.data.prepared import PreparedData, prepare_dataset

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(20):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{k:02d}.png")
    for k in range(20):  # copies and links of every image: each pair must share a split
        shutil.copy(root / f"{k:02d}.png", root / f"copy{k:02d}.png")
        os.symlink(f"{k:02d}.png", root / f"link{k:02d}.png")
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(source=str(root), resolution=16, shard_images=8, workers=1,
                               val_fraction=0.2, rectifier_fraction=0.3), out, progress=False)
    data = PreparedData(out)
    where = {i: s for s in ("train", "rectifier", "val") for i in data.ids(s)}
    assert len(where) == 60 and json.loads((out / "dataset.json").read_text())["duplicates"] == 40
    for k in range(20):
        assert where[f"{k:02d}.png"] == where[f"copy{k:02d}.png"] == where[f"link{k:02d}.png"]
    shards = pds.dataset([str(out / s["file"]) for s in data.meta["shards"]])
    for split in ("train", "rectifier", "val"):  # the key-range filter agrees with the index
        kept = shards.to_table(filter=data.split_filter(split), columns=["id"])
        assert sorted(os.fsdecode(i) for i in kept.column("id").to_pylist()) == data.ids(split)


def test_outputs_of_deleted_or_refused_inputs_are_listed_and_removed_on_request(folder, models,  # noqa: F811
                                                                                tmp_path):
    """They stayed in --out with no mention."""
    photos = _photos(folder, tmp_path, "a.png", "b.png", "sub/c.png")
    out = tmp_path / "out"
    _job(models, photos, out)
    (photos / "b.png").unlink()
    (photos / "sub/c.png").write_bytes(b"not an image any more")
    (out / "reconstruction/notes.txt").write_text("mine")
    kept = _job(models, photos, out)
    assert kept.stale == ["reconstruction/b.png", "reconstruction/sub/c.png"]
    assert kept.counts["stale"] == 2 and "2 stale outputs kept" in kept.summary
    assert (out / "reconstruction/b.png").is_file()
    removed = _job(models, photos, out, remove_stale=True)
    assert removed.stale == kept.stale and "2 stale outputs removed" in removed.summary
    assert sorted(p.name for p in (out / "reconstruction").rglob("*") if p.is_file()) == [
        "a.png", "notes.txt"]
    assert _job(models, photos, out).stale == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs at tmp_path/disk (unmounted after), or a skip saying why there is none."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a 3 MB tmpfs here: {made.stderr.strip() or made.returncode}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=False)  # (writers may hold a log open)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_ends_with_a_manifest_and_a_summary(folder, models, tmp_path, small_disk):  # noqa: F811
    """ENOSPC ended in a traceback with no manifest and no summary, after a torn done-log line."""
    photos = _photos(folder, tmp_path, "a.png", "b.png", "c.png")
    out = small_disk / "out"
    filled = []

    def fill_after_first(items, job, cfg, on_batch, progress):
        eb.execute_plain(items[:1], job, cfg, on_batch, progress)
        filled.append(_fill(small_disk))
        eb.execute_plain(items[1:], job, cfg, on_batch, progress)

    result = _job(models, photos, out, "edit_batch.batch_size=1", executor=fill_after_first)
    assert result.exit_code == eb.EXIT_FAILED and (out / "manifest.parquet").is_file()
    assert _reasons(result) == {"a.png": "ok", "b.png": "no_space", "c.png": "no_space"}
    assert "no_space 2" in result.summary
    for log in (out / "_log").glob("*.jsonl"):  # no torn line
        assert log.read_bytes().endswith(b"\n") or not log.read_bytes()
    filled[0].unlink()
    again = _job(models, photos, out, "edit_batch.batch_size=1")
    assert again.exit_code == 0 and again.counts["scheduled"] == 2 and again.counts["edited_before"] == 1


def test_object_storage_uris_are_refused_up_front_not_written_as_local_folders(tmp_path):
    """`--out s3://bucket/out` once wrote a local folder ./s3:/bucket/out: every command refuses
    a URI where it cannot serve one with one line naming it and the fix, exit 2, before any work
    (edit_batch's --input, --out, --root, --backbone and --edits take URIs:
    tests/test_object_storage.py)."""
    import subprocess
    import sys

    from hfedit.validation import UsageError, refuse_uris

    root = Path(__file__).resolve().parents[1]
    for argv in (["--input", "s3://bucket/in", "--out", "out"], ["--out", "gs://b/x"],
                 ["--set", "data.source=s3://bucket/raw"]):
        with pytest.raises(UsageError, match=r"(s3|gs)://.* local paths only"):
            refuse_uris(argv, "edit_batch")
    refuse_uris(["--edits", "models:/hfedit-edit-smiling@champion",
                 "--set", "runtime.mlflow.tracking_uri=http://127.0.0.1:5000"], "edit_batch")
    refuse_uris(["--input", "s3://bucket/in", "--out=s3://bucket/out"], "edit_batch",
                allowed=("--input", "--out"))
    with pytest.raises(UsageError, match=r"s3://bucket/raw.* local paths only"):
        refuse_uris(["--input", "s3://bucket/in", "--set", "data.source=s3://bucket/raw"],
                    "edit_batch", allowed=("--input",))
    for cmd in ([sys.executable, str(root / "stages/backbone.py"), "--data", "s3://bucket/in",
                 "--out", "out"],
                [sys.executable, "-m", "hfedit", "reconstruct", "s3://bucket/photo.jpg"]):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "s3://bucket/" in proc.stderr and "local" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "s3:").exists()


def test_the_job_lock_survives_the_output_folder_being_removed(tmp_path, monkeypatch):
    """The lock lived in --out: after the folder was removed under a running job, a second job
    took a fresh lock and both ran. It now lives outside --out, keyed by the folder's path."""
    import shutil

    from pipelines.batch_job import UsageError

    monkeypatch.setenv("HFEDIT_LOCK_DIR", str(tmp_path / "locks"))
    out = tmp_path / "out"
    with eb._locked(out, []):
        assert not any(out.iterdir())  # nothing of the lock in the user's folder
        shutil.rmtree(out)
        with pytest.raises(UsageError, match="another edit_batch job"):
            with eb._locked(out, []):
                pass
    with eb._locked(out, []):  # released with the first job
        pass
    assert eb.lock_path(out) != eb.lock_path(tmp_path / "other")


def test_damaged_progressive_jpegs_are_refused(tmp_path):
    """Progressive JPEGs with zeroed bytes were edited into garbage (the hand-written check
    covers sequential JPEGs only); libjpeg-turbo's strict decode now refuses them as corrupt."""
    import io

    from PIL import Image
    from skimage import data as skdata

    from hfedit.data.images import ImageError, load_image

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((256, 256)).save(buf, "JPEG", quality=90,
                                                               progressive=True)
    clean = buf.getvalue()
    (tmp_path / "clean.jpg").write_bytes(clean)
    load_image(tmp_path / "clean.jpg", 10**8)  # a whole progressive JPEG is accepted
    start, end, refused = clean.find(b"\xff\xda") + 12, len(clean) - 2, 0
    for k in range(12):
        at = start + (end - start - 64) * (k + 1) // 13
        path = tmp_path / f"damaged{k}.jpg"
        path.write_bytes(clean[:at] + bytes(64) + clean[at + 64:])
        try:
            load_image(path, 10**8)
        except ImageError as err:
            assert err.reason == "corrupt" and "libjpeg-turbo" in str(err)
            refused += 1
    assert refused >= 10  # benchmarks/jpeg_strict.py: 23 of 24 at two sizes
