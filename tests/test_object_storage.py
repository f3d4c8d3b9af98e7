"""Object storage (issue 23) against a real S3-compatible server (moto on 127.0.0.1, stopped by
its PID): :mod:`hfedit.storage`, and edit_batch reading its inputs, its models and writing its
outputs on a bucket. The jobs edit tiny faces in a plain loop (no Ray); tests/test_two_nodes.py
runs a bucket-to-bucket job on two Ray nodes."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hfedit.storage import Location, local_copy
from pipelines import edit_batch as eb
from tests.servers import S3_BUCKET, s3_server
from tests.test_data import folder  # noqa: F401 - real faces and broken files
from tests.test_edit_batch import _cfg, _run, models  # noqa: F401 - tiny backbone + rectifier


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(client environment, the server's request log)."""
    base = tmp_path_factory.mktemp("s3")
    with s3_server(base) as env:
        patch = pytest.MonkeyPatch()
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setenv("HFEDIT_CACHE", str(base / "cache"))
        yield env, base / "moto.log"
        patch.undo()


def _uri(prefix: str) -> str:
    return f"s3://{S3_BUCKET}/{prefix}"


def _upload(folder_: Path, uri: str, names: list[str] | None = None) -> None:
    loc = Location(uri)
    for path in sorted(folder_.rglob("*")):
        rel = path.relative_to(folder_).as_posix()
        if path.is_file() and (names is None or rel in names):
            loc.write_bytes(rel, path.read_bytes())


def test_a_write_is_one_put_seen_whole_and_listing_reading_deleting_work(s3):
    _, log = s3
    loc = Location(_uri("basics"))
    data = os.urandom(300_000)
    assert loc.write_bytes("a/b.bin", data) == _uri("basics/a/b.bin")
    requests = [line for line in log.read_text().splitlines() if "/basics/a/b.bin" in line]
    assert len([r for r in requests if '"PUT ' in r]) == 1 and not any("uploads" in r for r in requests)
    assert loc.files() == {"a/b.bin": 300_000} and loc.files("a", recursive=False) == {"a/b.bin": 300_000}
    assert loc.read_bytes("a/b.bin") == data and loc.size("a/b.bin") == 300_000
    assert loc.size("a/none.bin") is None and loc.files("nothing") == {}
    with pytest.raises(FileNotFoundError):
        loc.read_bytes("a/none.bin")
    loc.delete("a/b.bin")
    loc.delete("a/b.bin")  # gone already: nothing
    assert loc.files() == {}


def test_a_model_folder_is_copied_once_per_node_and_again_when_it_changes(s3, tmp_path):
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "unet/weights.bin").write_bytes(b"1" * 1000)
    (src / "hfedit.json").write_text("{}")
    _upload(src, _uri("model"))
    first = local_copy(_uri("model"))
    assert (first / "unet/weights.bin").read_bytes() == b"1" * 1000
    inode = first.stat().st_ino
    assert local_copy(_uri("model")).stat().st_ino == inode  # same listing: not fetched again
    Location(_uri("model")).write_bytes("unet/weights.bin", b"2" * 1001)
    again = local_copy(_uri("model"))
    assert again == first and again.stat().st_ino != inode
    assert (again / "unet/weights.bin").read_bytes() == b"2" * 1001
    assert local_copy(str(src)) == src  # a local folder is itself


def _objects(uri: str) -> dict[str, bytes]:
    loc = Location(uri)
    return {rel: loc.read_bytes(rel) for rel in loc.files() if rel.endswith(".png")}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _local_pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_edit_batch_from_a_bucket_to_a_bucket_with_models_there_equals_the_local_job(
        s3, folder, models, tmp_path, monkeypatch):  # noqa: F811
    """`--input s3://...` was 'no such folder', `--out s3://...` wrote a local ./s3:/ folder.
    Inputs, models and outputs on the bucket now give the local job's PNGs byte for byte, the
    manifest and done-log live on the bucket, reruns skip by the logged size and redo what
    changed."""
    root, _ = folder
    backbone, edits = models
    monkeypatch.chdir(tmp_path)
    names = ["faces/lfw_0.png", "faces/lfw_1.png", "bad/truncated.png", "bad/empty.png"]
    local_in = tmp_path / "in"
    for name in names:
        (local_in / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, local_in / name)
    (local_in / "notes.txt").write_text("not an image")
    _upload(local_in, _uri("in"))
    _upload(backbone, _uri("models/backbone"))
    _upload(edits, _uri("models/edits"))

    local = _run(_cfg(edits), local_in, tmp_path / "out", backbone, executor=eb.execute_plain)
    stored = _run(_cfg(_uri("models/edits")), _uri("in"), _uri("out"), _uri("models/backbone"),
                  executor=eb.execute_plain)
    assert stored.exit_code == local.exit_code == eb.EXIT_FAILED  # the two bad files
    assert dict(zip(stored.manifest.id, stored.manifest.reason.fillna("ok"))) == {
        "faces/lfw_0.png": "ok", "faces/lfw_1.png": "ok", "bad/truncated.png": "truncated",
        "bad/empty.png": "empty"}
    assert stored.ignored == ["notes.txt"]
    assert stored.manifest.input[0].startswith(_uri("in/"))
    pngs = _objects(_uri("out"))
    assert pngs == _local_pngs(tmp_path / "out") and len(pngs) == 4  # 2 faces x 2 attributes
    assert not (tmp_path / "s3:").exists()
    store = Location(_uri("out"))
    manifest = pd.read_parquet(io.BytesIO(store.read_bytes("manifest.parquet")))
    cols = ["id", "attribute", "status", "reason", "output", "seed", "fingerprint", "signature"]
    assert manifest[cols].equals(local.manifest[cols])
    assert [r for r in store.files() if not r.endswith(".png")] == [
        "_log/0-compacted.jsonl", "manifest.parquet"]  # per-image log objects compacted, no lock

    again = _run(_cfg(_uri("models/edits")), _uri("in"), _uri("out"), _uri("models/backbone"),
                 executor=eb.execute_plain)
    assert again.counts["scheduled"] == 0 and again.counts["edited_before"] == 2
    store.delete("smiling/faces/lfw_0.png")
    store.write_bytes("reconstruction/faces/lfw_1.png", pngs["reconstruction/faces/lfw_1.png"][:100])
    redo = _run(_cfg(_uri("models/edits")), _uri("in"), _uri("out"), _uri("models/backbone"),
                executor=eb.execute_plain)
    assert redo.counts["scheduled"] == 2 and _objects(_uri("out")).keys() == pngs.keys()
    for rel, data in _objects(_uri("out")).items():  # redone in other batches: float rounding
        assert np.abs(_pixels(data) - _pixels(pngs[rel])).max() <= 1, rel

    listed = tmp_path / "list.txt"  # a local list file naming objects by URI
    listed.write_text(f"{_uri('in/faces/lfw_0.png')}\n{_uri('in/faces/gone.png')}\n")
    result = _run(_cfg(edits, "edit_batch.attributes=[reconstruction]"), listed, tmp_path / "out2",
                  backbone, executor=eb.execute_plain)
    assert dict(zip(result.manifest.id, result.manifest.reason.fillna("ok"))) == {
        f"{S3_BUCKET}/in/faces/lfw_0.png": "ok", f"{S3_BUCKET}/in/faces/gone.png": "not_a_file"}
    only = next(iter(_local_pngs(tmp_path / "out2").values()))
    assert only == pngs["reconstruction/faces/lfw_0.png"]


def test_prepare_from_a_bucket_to_a_bucket_equals_the_local_prepare_and_resends_nothing(
        s3, folder, tmp_path):  # noqa: F811
    """The prepare stage as a user runs it, source and output on the bucket: the same shards,
    manifest reasons and splits as a local prepare of the same files; a rerun uploads no shard;
    a new input on the store redoes its shard and re-sends only that."""
    import subprocess
    import sys

    from hfedit.config import load_config
    from hfedit.data.prepared import PreparedData, prepare_dataset

    _, log = s3
    root, expected = folder
    src = tmp_path / "src"  # the regular files (a store has no links or fifos)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            (src / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, src / path.relative_to(root))
    _upload(src, _uri("raw"))
    settings = ["--set", "data.resolution=16", "--set", "data.shard_images=8"]
    cfg = load_config(overrides=[f"data.source={src}", *settings[1::2]]).data  # as the stage's
    local = prepare_dataset(cfg, tmp_path / "local", progress=False)
    project = Path(__file__).resolve().parents[1]

    def prepare(*extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        return subprocess.run([sys.executable, str(project / "stages/prepare.py"), "--out",
                               _uri("prepared"), "--set", f"data.source={_uri('raw')}",
                               *settings, *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    proc = prepare()
    assert proc.returncode == 0, proc.stderr
    store = Location(_uri("prepared"))
    manifest = json.loads(store.read_bytes("manifest.json"))
    got = {r["id"]: r["status"] if r["status"] == "ok" else r["reason"] for r in manifest["rows"]}
    assert got == {r.id: r.status if r.status == "ok" else r.reason for r in local.rows}
    assert got["bad/truncated.png"] == expected["bad/truncated.png"] == "truncated"
    assert got["bad/empty.png"] == "empty" and got["faces/astronaut.jpg"] == "ok"
    assert all(r["source"] == _uri(f"raw/{r['id']}") for r in manifest["rows"])
    shards = [rel for rel in store.files() if rel.endswith(".parquet")]
    assert len(shards) >= 2 and all(store.read_bytes(rel) == (tmp_path / "local" / rel).read_bytes()
                                    for rel in shards)
    data, mine = PreparedData(_uri("prepared")), PreparedData(tmp_path / "local")
    for split in ("train", "val"):
        assert data.ids(split) == mine.ids(split)
        assert np.array_equal(data.read_u8(split, range(data.count(split))),
                              mine.read_u8(split, range(mine.count(split))))

    before = len(log.read_text().splitlines())
    assert prepare().returncode == 0
    puts = [r for r in log.read_text().splitlines()[before:] if '"PUT ' in r]
    assert puts and not any(".parquet" in r for r in puts), puts  # records, index, manifest only
    Location(_uri("raw")).write_bytes("zz/new.png", (src / "faces/astronaut.png").read_bytes())
    before = len(log.read_text().splitlines())
    assert prepare().returncode == 0
    sent = [r for r in log.read_text().splitlines()[before:] if '"PUT ' in r and ".parquet" in r]
    last = sorted(shards)[-1]  # the new input sorts last: only the last shard changes
    assert len(sent) == 1 and last in sent[0], sent
    assert "zz/new.png" in PreparedData(_uri("prepared")).ids("train") + \
        PreparedData(_uri("prepared")).ids("val") + PreparedData(_uri("prepared")).ids("rectifier")


def test_a_registered_model_for_a_job_on_a_bucket_is_uploaded_beside_its_outputs(
        s3, models, tmp_path, monkeypatch):  # noqa: F811
    """``--edits models:/...`` was fetched into the driver's disk and its path sent to every
    node; with ``--out`` on a store it is uploaded under ``<out>/_models/`` and the job names it
    by URI (each node fetches its own copy)."""
    import argparse

    import mlflow

    from pipelines.serving import log_rectifier_model

    backbone, edits = models
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        log_rectifier_model(_cfg(edits), run.info.run_id, backbone, edits / "smiling",
                            "edit-smiling", "smiling")
    args = argparse.Namespace(out=_uri("registry"), edits="models:/hfedit-edit-smiling@champion",
                              backbone=eb.BACKBONE_DEFAULT, attributes=["old"])
    eb.resolve_model_uris(args)
    assert (args.edits, args.backbone) == (_uri("registry/_models/edits"),
                                           _uri("registry/_models/backbone"))
    assert args.attributes == ["old", "smiling"]
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (local_copy(args.backbone) / weights).read_bytes() == (backbone / weights).read_bytes()
    rect = "smiling/rectifier.safetensors"
    assert (local_copy(args.edits) / rect).read_bytes() == (edits / rect).read_bytes()
    assert not (tmp_path / "s3:").exists()


def test_evaluate_reads_its_models_and_the_batch_manifest_from_a_bucket(s3, models, tmp_path):  # noqa: F811
    """evaluate's inputs given as URIs: the models fetched into this machine's cache, of the
    batch job's output only its manifest; a missing bucket refused before any work."""
    import argparse

    from hfedit.data.batch_manifest import MANIFEST
    from hfedit.validation import UsageError
    from stages.evaluate import fetched

    backbone, edits = models
    _upload(backbone, _uri("eval/backbone"))
    _upload(edits, _uri("eval/edits"))
    _upload(edits / "smiling", _uri("eval/rectifier"))
    Location(_uri("eval/batch")).write_bytes(MANIFEST, b"id,attribute,status\n")
    Location(_uri("eval/batch")).write_bytes("smiling/a.png", b"not fetched")
    args = argparse.Namespace(**{k: _uri(f"eval/{k}") for k in ("backbone", "rectifier", "edits",
                                                                 "batch")}, data=str(tmp_path))
    got = fetched(args, tmp_path)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (got[0] / weights).read_bytes() == (backbone / weights).read_bytes()
    assert (got[1] / "rectifier.json").read_bytes() == (edits / "smiling/rectifier.json").read_bytes()
    assert sorted(p.name for p in got[2].iterdir() if not p.name.startswith(".")) == ["smiling"]
    assert sorted(p.name for p in got[3].iterdir()) == [MANIFEST]
    args.edits = "s3://no-such-bucket/edits"
    with pytest.raises(UsageError, match="--edits s3://no-such-bucket/edits.*does not exist"):
        fetched(args, tmp_path)


def test_a_live_job_lock_on_the_bucket_refuses_a_second_job_and_a_dead_ones_is_taken_over(
        s3, folder, models, tmp_path):  # noqa: F811
    root, _ = folder
    backbone, edits = models
    out = Location(_uri("locked"))
    cfg = _cfg(edits, "edit_batch.attributes=[reconstruction]")
    live = {"run": "other", "host": "elsewhere", "pid": 1, "time": time.time()}
    out.write_bytes(eb.LOCK, json.dumps(live).encode())
    listed = tmp_path / "one.txt"
    listed.write_text("faces/lfw_0.png\n")
    with pytest.raises(eb.UsageError, match="another edit_batch job .*other.* elsewhere"):
        _run(cfg, listed, out.text, backbone, root=str(root), executor=eb.execute_plain)
    assert out.files() == {eb.LOCK: out.size(eb.LOCK)}  # refused before any work
    out.write_bytes(eb.LOCK, json.dumps({**live, "time": time.time() - eb.LOCK_FRESH_S - 1}).encode())
    result = _run(cfg, listed, out.text, backbone, root=str(root), executor=eb.execute_plain)
    assert result.exit_code == eb.EXIT_OK and out.size(eb.LOCK) is None  # taken over, released


def test_an_unreachable_store_is_one_line_naming_it_and_nothing_local_is_written(s3, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    script = Path(__file__).resolve().parents[1] / "pipelines/edit_batch.py"
    proc = subprocess.run([sys.executable, str(script), "--input", str(tmp_path), "--out",
                           "s3://bucket/out", "--no-track"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == eb.EXIT_USAGE, proc.stderr
    assert "s3://bucket/out" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s3:").exists()


def test_a_missing_bucket_or_an_unknown_scheme_is_refused_before_any_work(s3, tmp_path):
    """A bucket that does not exist failed only at the first PUT, after the work."""
    listed = tmp_path / "one.txt"
    listed.write_text("x.png\n")
    for flag, args in (("--out", (listed, "s3://no-such-bucket/out")),
                       ("--input", ("s3://no-such-bucket/in", tmp_path / "out")),
                       ("--out", (listed, "foo://x/out"))):
        with pytest.raises(eb.UsageError) as err:
            eb.run_job(_cfg(tmp_path, "edit_batch.attributes=[reconstruction]"), *map(str, args),
                       "models/backbone", progress=False, executor=eb.execute_plain)
        text = str(err.value)
        assert text.startswith(flag) and ("no-such-bucket" in text or "foo://" in text), text
        assert "does not exist" in text or "scheme" in text, text
    assert not (tmp_path / "out").exists()
