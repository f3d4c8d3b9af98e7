"""The prepared dataset (hfedit.data.prepared): uint8 Parquet shards written by streaming, read per batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from hfedit.config import DataConfig
from hfedit.data.manifest import load_manifest
from hfedit.data.images import load_image, to_tensor
from hfedit.data.prepared import PreparedData, load_split, prepare_dataset
from tests.test_data import folder  # noqa: F401  (the folder of good, odd and broken files)

RES = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded(folder, tmp_path_factory):  # noqa: F811
    """The mixed folder prepared in shards of 4 inputs by 2 decode processes, with disjoint
    backbone (train), rectifier and val splits."""
    root, _ = folder
    out = tmp_path_factory.mktemp("sharded")
    cfg = DataConfig(source=str(root), resolution=RES, shard_images=4, workers=2,
                     rectifier_fraction=0.3)
    return out, prepare_dataset(cfg, out, progress=False)


def test_every_input_is_in_a_shard_or_listed_with_its_reason(folder, sharded):  # noqa: F811
    import pyarrow.parquet as pq

    root, expected = folder
    out, manifest = sharded
    assert {r.id: r.status if r.status == "ok" else r.reason for r in manifest.rows} == expected
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["shards"]) == -(-len(expected) // 4)  # one shard per 4 inputs
    stored: dict[str, tuple[int, int]] = {}
    for k, shard in enumerate(meta["shards"]):
        table = pq.read_table(out / shard["file"])
        assert table.num_rows == shard["rows"] <= 4
        for row, raw in enumerate(table.column("id").to_pylist()):
            stored[os.fsdecode(raw)] = (k, row)
    ok = [r for r in manifest.rows if r.status == "ok"]
    assert stored == {r.id: (r.shard, r.row) for r in ok}  # each good input once, where listed
    assert all(r.shard is None for r in manifest.refused)
    assert load_manifest(out) == manifest
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_the_reader_returns_the_prepare_stages_tensors_bit_for_bit(folder, sharded):  # noqa: F811
    root, _ = folder
    out, manifest = sharded
    data = PreparedData(out)
    assert all(data.count(s) >= 2 for s in ("train", "rectifier", "val"))
    for split in ("train", "rectifier", "val"):
        ids = data.ids(split)
        assert ids == sorted(r.id for r in manifest.rows if r.split == split)
        # Reversed, with a repeat: positions are honoured, whatever row group they live in.
        order = list(reversed(range(len(ids)))) + [0]
        got = data.read(split, order)
        for pos, i in enumerate(order):
            expected = to_tensor(load_image(root / ids[i], 10**8).image, RES)
            assert torch.equal(got[pos], expected), ids[i]
    train = load_split(out, "train")
    assert torch.equal(train[1:3], data.read("train", [1, 2]))
    assert torch.equal(train[torch.tensor([2, 0])], data.read("train", [2, 0]))
    with pytest.raises(IndexError, match="train split .* has"):
        data.read("train", [len(train)])


def test_the_split_filter_selects_exactly_the_splits_rows(sharded):
    """What Ray Data's read of a split keeps: Parquet rows with ``key`` on the split's side."""
    import pyarrow.dataset as pds

    out, _ = sharded
    data = PreparedData(out)
    shards = pds.dataset([str(out / s["file"]) for s in data.meta["shards"]])
    for split in ("train", "rectifier", "val"):
        kept = shards.to_table(filter=data.split_filter(split), columns=["id"])
        assert sorted(os.fsdecode(i) for i in kept.column("id").to_pylist()) == data.ids(split)


def test_the_three_roles_are_disjoint_and_rectifier_fraction_0_shares_the_backbones(folder, sharded,
                                                                                     tmp_path):  # noqa: F811
    """The paper's setting: no image trains both the backbone and the rectifier, none of either
    is evaluated; with data.rectifier_fraction = 0 the rectifier reads the backbone's images (a
    folder prepared before the rectifier had a split reads the same way)."""
    import pyarrow.dataset as pds

    root, _ = folder
    out, manifest = sharded
    data = PreparedData(out)
    roles = [set(data.ids(s)) for s in ("train", "rectifier", "val")]
    assert not (roles[0] & roles[1]) and not (roles[0] & roles[2]) and not (roles[1] & roles[2])
    assert set().union(*roles) == {r.id for r in manifest.rows if r.status == "ok"}
    assert manifest.counts["rectifier"] == len(roles[1]) and not data.meta["rectifier_shared"]

    shared_out = tmp_path / "shared"
    shared = prepare_dataset(DataConfig(source=str(root), resolution=RES, shard_images=4),
                             shared_out, progress=False)
    one = PreparedData(shared_out)
    assert one.ids("rectifier") == one.ids("train") and one.ids("val") == data.ids("val")
    assert shared.counts["rectifier"] == 0 and one.meta["rectifier_shared"]
    shards = pds.dataset([str(shared_out / s["file"]) for s in one.meta["shards"]])
    kept = shards.to_table(filter=one.split_filter("rectifier"), columns=["id"])
    assert sorted(os.fsdecode(i) for i in kept.column("id").to_pylist()) == one.ids("train")
    # the older index (train and val only) reads the rectifier's split as train's
    index = json.loads((shared_out / "index.json").read_text())
    del index["rectifier"]
    (shared_out / "index.json").write_text(json.dumps(index))
    assert PreparedData(shared_out).ids("rectifier") == one.ids("train")


@pytest.mark.timeout(600)
def test_ray_data_streams_the_split_while_training_workers_hold_every_cpu(sharded, tmp_path):
    """What pretraining's Ray Train workers iterate: the split's rows in its order, equal to the
    reader's, and the reads start although two 1-CPU actors hold both CPUs of the cluster
    (ray.data.read_parquet's listing task would wait forever there)."""
    import ray

    from hfedit.data.images import pixels_to_tensor
    from pipelines.ray_runtime import split_dataset, start_local_ray

    out, _ = sharded
    data = PreparedData(out)
    temp = tempfile.mkdtemp(prefix="rayds", dir="/tmp")  # short: Unix socket paths are limited
    start_local_ray(2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                    runtime_env={"env_vars": {"HFEDIT_ROOT": str(ROOT)}})
    try:
        @ray.remote(num_cpus=1)
        class Holder:
            def ping(self) -> int:
                return 1

        holders = [Holder.remote() for _ in range(2)]
        assert ray.get([h.ping.remote() for h in holders]) == [1, 1]
        for split in ("train", "val"):
            rows = split_dataset(data, split, groups_per_task=1).take_all()
            got = pixels_to_tensor([r["pixels"] for r in rows], RES)
            assert torch.equal(got, data.read(split, range(data.count(split)))), split
        # a URI (file://, s3://): the read tasks got bare shard names and failed
        rows = split_dataset(PreparedData(f"file://{out}"), "val", groups_per_task=1).take_all()
        got = pixels_to_tensor([r["pixels"] for r in rows], RES)
        assert torch.equal(got, data.read("val", range(data.count("val"))))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_uri_reads_like_a_path(sharded):
    out, _ = sharded
    by_uri = PreparedData(f"file://{out}")
    assert torch.equal(by_uri.read("val", [0]), PreparedData(out).read("val", [0]))
    assert by_uri.digest == PreparedData(out).digest


def test_an_old_single_file_dataset_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    save_file({"images": torch.zeros(2, 3, 8, 8)}, str(tmp_path / "train.safetensors"))
    with pytest.raises(FileNotFoundError, match="old single-file format.*rerun prepare.*dvc repro prepare"):
        load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        load_split(tmp_path / "nothing", "train")


def test_the_split_and_shards_do_not_depend_on_the_number_of_workers(folder, sharded, tmp_path):  # noqa: F811
    root, _ = folder
    out, manifest = sharded
    alone = prepare_dataset(DataConfig(source=str(root), resolution=RES, shard_images=4, workers=1,
                                       rectifier_fraction=0.3), tmp_path, progress=False)
    assert alone.rows == manifest.rows
    assert (tmp_path / "index.json").read_text() == (out / "index.json").read_text()
    for shard in json.loads((out / "dataset.json").read_text())["shards"]:
        assert (tmp_path / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()


# ------------------------------------------------------------------------ interrupted prepare
def _photos(folder: Path, n: int) -> None:
    """``n`` distinct 192 px JPEGs: crops and flips of scikit-image's astronaut."""
    folder.mkdir(parents=True)
    astro = skdata.astronaut()
    for i in range(n):
        y, x = (i * 7) % 300, (i * 13) % 300
        crop = astro[y: y + 192, x: x + 192]
        Image.fromarray(crop[:, ::-1] if i % 2 else crop).save(folder / f"p{i:04d}.jpg", quality=90)


PREPARE = ("import sys; from hfedit.config import DataConfig; from hfedit.data.prepared import "
           "prepare_dataset; prepare_dataset(DataConfig(source=sys.argv[1], resolution=64, "
           "shard_images=20, workers=1), sys.argv[2], progress=False)")


@pytest.mark.timeout(300)
def test_a_killed_prepare_resumes_without_redoing_complete_shards(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "prepared"
    _photos(src, 400)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, str(src), str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("shards/*.json"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare ended before it could be killed"
    assert not (out / "dataset.json").exists()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shards/*")
            if (out / "shards" / f"{p.stem}.json").exists()}
    assert 6 <= len(done) < 40  # some shards (+ records) complete, most not

    subprocess.run([sys.executable, "-c", PREPARE, str(src), str(out)], env=env, check=True)
    kept = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name in done
            for p in [out / "shards" / name]}
    assert kept == done  # the complete shards were not written again
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-c", PREPARE, str(src), str(fresh)], env=env, check=True)
    for name in ("index.json", "dataset.json", "manifest.json"):
        assert (out / name).read_text() == (fresh / name).read_text(), name
    for shard in out.glob("shards/*.parquet"):
        assert shard.read_bytes() == (fresh / "shards" / shard.name).read_bytes(), shard.name
    assert load_manifest(out).counts["ok"] == 400


def test_a_changed_setting_redoes_the_shards(tmp_path):
    src = tmp_path / "photos"
    _photos(src, 30)
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(source=str(src), resolution=32, shard_images=20), out, progress=False)
    prepare_dataset(DataConfig(source=str(src), resolution=16, shard_images=20), out, progress=False)
    x = load_split(out, "train")[0]
    assert x.shape == (3, 16, 16)
    first = load_split(out, "train").ids[0]
    assert torch.equal(x, to_tensor(load_image(src / first, 10**8).image, 16))
    # a shorter input list leaves no stale shard behind
    prepare_dataset(DataConfig(source=str(src), resolution=16, shard_images=20, max_images=10),
                    out, progress=False)
    assert sorted(p.name for p in out.glob("shards/*")) == ["00000.json", "00000.parquet"]


def test_refusals_cross_to_the_decode_processes_and_back(folder, tmp_path):  # noqa: F811
    """2 decode processes, refusals found while listing (links, fifo) and while decoding: the
    manifest is the one a single process writes."""
    import pickle

    from hfedit.data.images import ImageError

    err = ImageError("broken_link", "/x/y.png", "dangling symlink to /x/z.png")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.path, str(back)) == (err.reason, err.path, str(err))
    root, expected = folder
    one = prepare_dataset(DataConfig(source=str(root), resolution=RES, shard_images=3, workers=1),
                          tmp_path / "one", progress=False)
    two = prepare_dataset(DataConfig(source=str(root), resolution=RES, shard_images=3, workers=2),
                          tmp_path / "two", progress=False)
    assert two.rows == one.rows
    assert {r.id: r.status if r.status == "ok" else r.reason for r in two.rows} == expected
