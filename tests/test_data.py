"""Data preparation: strict loading of every odd or broken file, mode conversion, the manifest,
the seeded split and the bundled real faces."""

from __future__ import annotations

import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data as skdata

from hfedit.config import DataConfig
from hfedit.data.manifest import DatasetError, load_manifest, split_ids
from hfedit.data.images import ImageError, load_image, save_png, to_pil, to_rgb, to_tensor
from hfedit.data.sources import bundled_images, iter_folder
from hfedit.data.prepared import load_split, prepare_dataset

RES = 16
GRADIENT = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))  # (16, 64)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _rotated_jpeg(path: Path) -> None:
    """40x20 stored image, red marker top-left, EXIF orientation 6 (display rotated 90 CW)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, quality=95, exif=exif.tobytes())


def _palette_with_transparency() -> Image.Image:
    """8x8 palette image: index 0 (black) transparent on the left half, index 1 red on the right."""
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))
    img.info["transparency"] = 0
    return img


def _rgba() -> Image.Image:
    """Left half fully transparent black, right half half-transparent red."""
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[:, 4:] = (255, 0, 0, 128)
    return Image.fromarray(arr)


def damaged_jpeg(how: str = "zeros") -> bytes:
    """scikit-image's astronaut (face crop, 200x200, quality 90) with 64 bytes in the middle of
    its compressed data zeroed (``zeros``) or cut out (``cut``): Pillow decodes both without an
    error, to garbage (mean |difference| 63 and 33 of 255)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()[30:230, 140:340]).save(buf, "JPEG", quality=90)
    data, mid = buf.getvalue(), len(buf.getvalue()) // 2
    return data[:mid] + (bytes(64) if how == "zeros" else b"") + data[mid + 64:]


def damaged_webp() -> bytes:
    """scikit-image's astronaut (face crop, 200x200) as a lossy WebP (quality 90) with 64 bytes
    in its middle zeroed: libwebp decodes it without an error (the format carries no checksum)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()[30:230, 140:340]).save(buf, "WEBP", quality=90)
    data, mid = buf.getvalue(), len(buf.getvalue()) // 2
    return data[:mid] + bytes(64) + data[mid + 64:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of real faces, odd-but-valid files and broken files; returns (root, id -> expected
    status or reason)."""
    base = tmp_path_factory.mktemp("raw")
    root = base / "images"
    for sub in ("faces", "odd", "bad"):
        (root / sub).mkdir(parents=True)
    astro = Image.fromarray(skdata.astronaut()[30:230, 140:340]).resize((64, 64))
    astro.save(root / "faces/astronaut.png")
    astro.save(root / "faces/astronaut.jpg", quality=90)
    for i, face in enumerate(skdata.lfw_subset()[:3]):
        Image.fromarray(np.round(face * 255).astype(np.uint8)).save(root / f"faces/lfw_{i}.png")
    expected = {"faces/astronaut.png": "ok", "faces/astronaut.jpg": "ok",
                **{f"faces/lfw_{i}.png": "ok" for i in range(3)}}

    Image.fromarray(skdata.astronaut()[::8, ::8]).convert("CMYK").save(root / "odd/cmyk.jpg")
    Image.fromarray(GRADIENT).save(root / "odd/gray16.png")
    _palette_with_transparency().save(root / "odd/palette_alpha.png")
    Image.fromarray(np.indices((8, 8)).sum(0) % 2 == 0).save(root / "odd/bilevel.png")
    _rgba().save(root / "odd/rgba.png")
    Image.new("LA", (8, 8), (90, 255)).save(root / "odd/grey_alpha.png")
    Image.fromarray((GRADIENT / 65535).astype(np.float32)).save(root / "odd/float.tif")
    _rotated_jpeg(root / "odd/rotated.jpg")
    os.symlink(root / "faces/astronaut.png", root / "odd/link_inside.png")
    expected |= {f"odd/{n}": "ok" for n in os.listdir(root / "odd")}

    jpeg, png = (root / "faces/astronaut.jpg").read_bytes(), (root / "faces/astronaut.png").read_bytes()
    bad = {
        "empty.png": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "random.png": (np.random.default_rng(0).bytes(4096), "not_an_image"),
        "notes.txt": (b"faces go here\n", "not_an_image"),
        "corrupt.png": (png[:100] + bytes(b ^ 0x5A for b in png[100:300]) + png[300:], "corrupt"),
        "corrupt_middle.jpg": (damaged_jpeg(), "corrupt"),
        "bomb_huge.png": (_png_header_only(100_000, 100_000), "too_large"),  # Pillow's bomb limit
        "bomb_64mp.png": (_png_header_only(8000, 8000), "too_large"),  # > data.max_pixels=40M
    }
    for name, (content, reason) in bad.items():
        (root / "bad" / name).write_bytes(content)
        expected[f"bad/{name}"] = reason
    (base / "secret.png").write_bytes(png)
    os.symlink(base / "secret.png", root / "bad/outside.png")
    os.symlink(base, root / "bad/outside_dir")
    os.symlink(root / "bad/missing.png", root / "bad/dangling.png")
    os.mkfifo(root / "bad/fifo.png")  # opening it would block forever
    expected |= {"bad/outside.png": "outside_root", "bad/outside_dir": "outside_root",
                 "bad/dangling.png": "broken_link", "bad/fifo.png": "not_a_file"}
    return root, expected


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_dataset(DataConfig(source=str(root), resolution=RES), out, progress=False)


def test_every_file_is_prepared_or_refused_with_its_reason(folder, prepared):
    root, expected = folder
    out, manifest = prepared
    got = {row.id: row.status if row.status == "ok" else row.reason for row in manifest.rows}
    assert got == expected
    c = manifest.counts
    assert c["inputs"] == len(expected) == c["ok"] + c["error"] == len(manifest.rows)
    assert c["train"] + c["val"] == c["ok"] == sum(v == "ok" for v in expected.values())
    for row in manifest.refused:  # the message names the file and says how to fix it
        assert row.id in row.message and "Fix:" in row.message, row
    assert load_manifest(out) == manifest
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_prepared_tensors_match_manifest(folder, prepared):
    root, _ = folder
    out, manifest = prepared
    splits = {s: load_split(out, s) for s in ("train", "val")}
    for name, split in splits.items():
        images = split[:]
        assert images.shape == (manifest.counts[name], 3, RES, RES)
        assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    astro = next(r for r in manifest.rows if r.id == "faces/astronaut.png")
    expected = to_tensor(load_image(root / astro.id, 10**6).image, RES)
    assert torch.equal(splits[astro.split][astro.index], expected)
    grad = next(r for r in manifest.rows if r.id == "odd/gray16.png")
    assert grad.mode == "I;16" and grad.size == [64, 16]
    row = splits[grad.split][grad.index][0, RES // 2]  # centre crop of the gradient: mid-range
    assert row.min() < -0.2 and row.max() > 0.2 and (row.diff() >= 0).all()
    preview = Image.open(out / "preview.png")
    assert preview.mode == "RGB" and preview.width > RES


def test_split_is_seeded_and_depends_only_on_the_set_of_ids():
    ids = [f"img_{i:03d}" for i in range(50)]
    train, val = split_ids(ids, 0.2, seed=0)
    assert len(val) == 10 and sorted(train + val) == ids
    assert split_ids(reversed(ids), 0.2, seed=0) == (train, val)
    assert split_ids(ids, 0.2, seed=1)[1] != val
    assert split_ids(ids[:2], 0.01, seed=0)[1] and not split_ids(ids[:1], 0.5, seed=0)[1]
    assert split_ids(ids[:3], 0.99, seed=0)[0]  # never an empty train split
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(ids, 1.0, seed=0)


def test_a_file_name_that_is_not_utf8_is_prepared_not_fatal(folder, tmp_path):
    """A name with byte 0xE9 (latin-1 'e acute') used to stop prepare in split_ids."""
    import json
    import shutil

    root, _ = folder
    src = tmp_path / "src"
    src.mkdir()
    odd = os.fsdecode(b"caf\xe9.png")  # holds a surrogate, as Python lists it
    for name in (odd, "a.png", "b.png"):
        shutil.copy(root / "faces/lfw_0.png", src / name)
    out = tmp_path / "prep"
    manifest = prepare_dataset(DataConfig(source=str(src), resolution=RES, val_fraction=0.34), out,
                               progress=False)
    assert {r.id: r.status for r in manifest.rows} == {odd: "ok", "a.png": "ok", "b.png": "ok"}
    assert manifest.counts["train"] + manifest.counts["val"] == 3
    text = (out / "manifest.json").read_text(encoding="ascii")  # escaped, readable anywhere
    assert "caf\\udce9.png" in text and json.loads(text)["rows"][2]["id"] == odd
    assert split_ids([odd, "a.png"], 0.5, 0) == split_ids(["a.png", odd], 0.5, 0)


def test_prepare_is_deterministic_and_seed_changes_the_split(folder, prepared, tmp_path):
    root, _ = folder
    _, first = prepared
    again = prepare_dataset(DataConfig(source=str(root), resolution=RES), tmp_path / "a", progress=False)
    assert again.rows == first.rows
    other = prepare_dataset(DataConfig(source=str(root), resolution=RES, seed=3), tmp_path / "b",
                            progress=False)
    assert {r.id for r in other.rows if r.split == "val"} != {r.id for r in first.rows if r.split == "val"}


def test_alpha_and_palette_are_composited_on_white(folder):
    root, _ = folder
    pal = np.asarray(load_image(root / "odd/palette_alpha.png", 10**6).image)
    assert (pal[:, :4] == 255).all() and (pal[:, 4:] == (255, 0, 0)).all()
    rgba = np.asarray(load_image(root / "odd/rgba.png", 10**6).image).astype(int)
    assert (rgba[:, :4] == 255).all()
    assert (np.abs(rgba[:, 4:] - (255, 127, 127)) <= 1).all()
    la = np.asarray(load_image(root / "odd/grey_alpha.png", 10**6).image)
    assert (la == 90).all()


def test_sixteen_bit_and_float_keep_their_range():
    """Pillow's plain convert('RGB') clips I;16 at 255 (all white); we scale 0..65535 -> 0..255."""
    for img in (Image.fromarray(GRADIENT), Image.fromarray(GRADIENT.astype(">u2")),
                Image.fromarray(GRADIENT.astype(np.int32)),
                Image.fromarray((GRADIENT / 65535).astype(np.float32))):
        rgb = np.asarray(to_rgb(img)).astype(int)  # (16, 64, 3)
        row = rgb[0, :, 0]
        assert row[0] == 0 and row[-1] == 255, img.mode
        assert (np.diff(row) >= 0).all() and (row == 255).mean() < 0.05, img.mode
        assert (rgb == rgb[..., :1]).all()


def test_cmyk_bilevel_and_exif_orientation(folder):
    root, _ = folder
    cmyk = load_image(root / "odd/cmyk.jpg", 10**6)
    reference = skdata.astronaut()[::8, ::8].astype(int)
    assert cmyk.mode == "CMYK" and np.abs(np.asarray(cmyk.image).astype(int) - reference).mean() < 8
    bilevel = np.asarray(load_image(root / "odd/bilevel.png", 10**6).image)
    assert set(np.unique(bilevel)) == {0, 255} and (bilevel[0, 0] == 255).all()
    assert (bilevel[0, 1] == 0).all()
    rot = load_image(root / "odd/rotated.jpg", 10**6)
    assert rot.size == (40, 20) and rot.image.size == (20, 40) and rot.orientation == 6
    pixels = np.asarray(rot.image).astype(int)  # red marker moved from top-left to top-right
    assert pixels[2, -3, 0] > 200 and pixels[2, -3, 2] < 60 and pixels[2, 2, 2] > 200


def test_refusals_raise_image_errors(folder):
    root, _ = folder
    with pytest.raises(ImageError, match="max_pixels=1000") as err:
        load_image(root / "faces/astronaut.png", max_pixels=1000)
    assert err.value.reason == "too_large" and "astronaut.png" in str(err.value)
    with pytest.raises(ImageError) as err:
        to_rgb(_fake_mode("BGR;24"))
    assert err.value.reason == "unsupported_mode"


def _fake_mode(mode: str) -> Image.Image:
    img = Image.new("RGB", (2, 2))
    img._mode = mode  # a mode no decoder here produces; to_rgb must refuse it, not guess
    return img


@pytest.mark.parametrize("how", ["zeros", "cut"])
def test_a_jpeg_damaged_in_its_middle_is_corrupt_not_garbage(tmp_path, how):
    import io

    bad = damaged_jpeg(how)
    with Image.open(io.BytesIO(bad)) as img:
        img.load()  # what used to be accepted: Pillow decodes it, silently
    (tmp_path / "photo.jpg").write_bytes(bad)
    with pytest.raises(ImageError, match="photo.jpg: damaged JPEG data") as err:
        load_image(tmp_path / "photo.jpg", 10**6)
    assert err.value.reason == "corrupt" and "Fix: " in str(err.value)


def test_a_format_that_can_hide_damage_is_labelled_unverified_or_refused(tmp_path):
    """A WebP with bytes zeroed mid-file was edited into garbage, silently: no check can see it,
    so the result says so (integrity "unverified") and data.require_verified refuses it."""
    face = Image.fromarray(skdata.astronaut()[30:230, 140:340])
    (tmp_path / "photo.webp").write_bytes(damaged_webp())
    loaded = load_image(tmp_path / "photo.webp", 10**6)
    face.save(tmp_path / "intact.webp", quality=90)
    intact = np.asarray(load_image(tmp_path / "intact.webp", 10**6).image, dtype=float)
    assert np.abs(np.asarray(loaded.image, dtype=float) - intact).mean() > 5  # garbage passed
    assert loaded.integrity == "unverified"
    with pytest.raises(ImageError, match="photo.webp: WEBP data carries nothing") as err:
        load_image(tmp_path / "photo.webp", 10**6, require_verified=True)
    assert err.value.reason == "unverified" and "convert it to PNG" in str(err.value)
    # what a decode proves for the formats that can show damage; require_verified takes them
    face.save(tmp_path / "photo.png")
    face.save(tmp_path / "photo.jpg", quality=90)
    face.convert("P").save(tmp_path / "photo.gif")
    face.save(tmp_path / "photo.tif")
    integrity = {p.name: load_image(p, 10**6).integrity for p in sorted(tmp_path.glob("photo.*"))}
    assert integrity == {"photo.gif": "structure", "photo.jpg": "structure",
                         "photo.png": "checksum", "photo.tif": "unverified",
                         "photo.webp": "unverified"}
    for name in ("photo.png", "photo.jpg", "photo.gif"):
        assert load_image(tmp_path / name, 10**6, require_verified=True).integrity != "unverified"


def test_prepare_records_integrity_and_require_verified_refuses(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    face = Image.fromarray(skdata.astronaut()[30:230, 140:340])
    face.save(src / "a.png")
    face.save(src / "b.jpg", quality=90)
    (src / "c.webp").write_bytes(damaged_webp())
    rows = {}
    for strict in (False, True):
        cfg = DataConfig(source=str(src), resolution=RES, val_fraction=0.0, require_verified=strict)
        manifest = prepare_dataset(cfg, tmp_path / f"out-{strict}", progress=False)
        rows[strict] = {r.id: (r.status, r.reason, r.integrity) for r in manifest.rows}
    assert rows[False] == {"a.png": ("ok", None, "checksum"), "b.jpg": ("ok", None, "structure"),
                           "c.webp": ("ok", None, "unverified")}
    assert rows[True] == {**rows[False], "c.webp": ("error", "unverified", None)}
    assert load_manifest(tmp_path / "out-True").counts["error"] == 1


def test_whole_jpegs_of_every_kind_pass_the_data_check(tmp_path):
    """Baseline at each chroma subsampling, grey, CMYK, odd sizes, optimised tables, restart
    markers and progressive: no false alarm."""
    astro = Image.fromarray(skdata.astronaut())
    kinds = {f"sub{s}": dict(subsampling=s) for s in (0, 1, 2)}
    kinds |= {"optimized": dict(optimize=True), "progressive": dict(progressive=True),
              "restarts": dict(restart_marker_blocks=5), "q100": dict(quality=100)}
    for name, kw in kinds.items():
        astro.save(tmp_path / f"{name}.jpg", **kw)
    astro.convert("L").save(tmp_path / "grey.jpg")
    astro.convert("CMYK").save(tmp_path / "cmyk.jpg")
    astro.resize((333, 127)).save(tmp_path / "odd.jpg")
    for path in sorted(tmp_path.glob("*.jpg")):
        loaded = load_image(path, 10**7)
        assert loaded.image.size == Image.open(path).size, path.name


def test_a_missing_file_is_reported_as_missing(tmp_path):
    with pytest.raises(ImageError, match=r"photo.png: no such file\. Fix"):
        load_image(tmp_path / "photo.png", 10**6)


def test_truncated_images_are_never_padded(folder, monkeypatch):
    root, _ = folder
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(root / "bad/truncated.jpg", 10**6)


def test_iter_folder_does_not_follow_links_out(folder):
    root, _ = folder
    entries = list(iter_folder(root))
    ids = [e.id for e in entries]
    assert ids == sorted(ids) and not any("secret" in i for i in ids)
    assert not any(i.startswith("bad/outside_dir/") for i in ids)
    with pytest.raises(DatasetError, match="no such folder"):
        list(iter_folder(root / "nope"))


def test_folder_without_images_names_the_folder(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.txt").write_text("x")
    (src / "b.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="junk.*2 files.*empty: 1, not_an_image: 1"):
        prepare_dataset(DataConfig(source=str(src)), tmp_path / "out", progress=False)
    assert load_manifest(tmp_path / "out").counts["error"] == 2


def test_tensor_round_trip_and_center_crop(tmp_path):
    bands = np.zeros((10, 30, 3), np.uint8)
    bands[:, :10, 0] = bands[:, 10:20, 1] = bands[:, 20:, 2] = 255  # red | green | blue
    cropped = to_tensor(Image.fromarray(bands), 8)
    assert torch.allclose(cropped[1], torch.ones(8, 8)) and (cropped[[0, 2]] < -0.9).all()
    squashed = to_tensor(Image.fromarray(bands), 8, center_crop=False)
    assert squashed[0, :, 0].min() > 0.9 and squashed[2, :, -1].min() > 0.9
    t = to_tensor(Image.fromarray(skdata.astronaut()), 32)
    assert torch.equal(to_tensor(to_pil(t), 32), t)
    save_png(t, tmp_path / "x.png")
    assert torch.equal(to_tensor(Image.open(tmp_path / "x.png"), 32), t)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_bundled_faces_ship_offline(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("bundled_images tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    images = list(bundled_images())
    ids = [i for i, _ in images]
    assert len(ids) == len(set(ids)) >= 102
    assert sum(i.startswith("skimage/lfw_subset/") for i in ids) == 100
    manifest = prepare_dataset(DataConfig(), tmp_path, progress=False)
    assert manifest.counts["ok"] == len(images) and manifest.counts["error"] == 0
    train, val = load_split(tmp_path, "train"), load_split(tmp_path, "val")
    assert len(train) + len(val) >= 100 and len(val) >= 1
    assert train[:].std() > 0.2  # real images, not blanks


def test_max_images_takes_the_first_inputs_in_order(folder, prepared, tmp_path):
    root, _ = folder
    full = prepared[1]
    n = len(full.rows) - 3
    sub = prepare_dataset(DataConfig(source=str(root), resolution=RES, max_images=n),
                          tmp_path / "sub", progress=False)
    assert [r.id for r in sub.rows] == [r.id for r in full.rows][:n]
    assert [r.status for r in sub.rows] == [r.status for r in full.rows][:n]
    assert sub.counts["ok"] < full.counts["ok"]
    with pytest.raises(ValueError, match="max_images"):
        prepare_dataset(DataConfig(source=str(root), max_images=-1), tmp_path / "bad", progress=False)


def test_prepare_refuses_an_output_that_is_a_file_before_any_work(tmp_path):
    from hfedit.validation import UsageError
    from stages.prepare import main

    (tmp_path / "prepared").write_text("a file")
    with pytest.raises(UsageError, match="prepared is a file, not a folder: give a folder"):
        main(["--out", str(tmp_path / "prepared")])


def test_a_labelled_grid_keeps_every_pixel_and_draws_each_label_beside_its_row(tmp_path):
    from hfedit.data.grids import make_grid_png

    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1  # 2 rows of 3
    plain = np.asarray(Image.open(make_grid_png(images, tmp_path / "plain.png", nrow=3)))
    labelled = np.asarray(Image.open(make_grid_png(images, tmp_path / "labelled.png", nrow=3,
                                                   row_labels=["source", ""], min_cell=64)))
    left = labelled.shape[1] - plain.shape[1] * 2
    assert labelled.shape[0] == plain.shape[0] * 2 and left > 0
    # enlarged x2 by nearest neighbour: every other pixel is the plain grid, exactly
    assert np.array_equal(labelled[::2, left::2], plain)
    margin = labelled[:, :left].min(axis=2)  # dark where text is drawn
    row = (32 + 2) * 2
    assert (margin[:row] < 128).any()  # "source" beside the first row
    assert not (margin[row:] < 128).any()  # no label beside the second
    with pytest.raises(ValueError, match="3 row_labels for a grid of 2 rows"):
        make_grid_png(images, tmp_path / "bad.png", nrow=3, row_labels=["a", "b", "c"])


@pytest.mark.parametrize("n,nrow", [(5, 3), (2, 8), (8, 4)])
def test_the_numpy_grid_is_torchvisions_make_grid(tmp_path, n, nrow):
    from torchvision.utils import make_grid

    from hfedit.data.grids import make_grid_png
    from hfedit.data.images import to_pil

    torch.manual_seed(n)
    images = torch.rand(n, 3, 16, 24) * 2 - 1
    ours = np.asarray(Image.open(make_grid_png(images, tmp_path / "g.png", nrow=nrow)))
    theirs = np.asarray(to_pil(make_grid(images, nrow=nrow, padding=2, pad_value=1.0)))
    assert np.array_equal(ours, theirs)


def test_prepare_and_the_config_import_no_torch():
    """prepare's processes (and anything that only reads the config) start without torch."""
    import subprocess
    import sys

    code = ("import sys, hfedit.config, hfedit.data.prepared, hfedit.data.images; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])
