"""The browser editor (pipelines/app.py) as a user meets it: the app started as its own process
on 127.0.0.1, driven in a real headless Chromium by Playwright. An edit made in the page is the
CLI's edit byte for byte (same image, settings, seed and thread count); a truncated upload, a
file that is not an image and one over the size limit are refused with the fix in the page;
several tabs queue; nothing is written outside the app's cache folder.

Needs Debian's chromium at /usr/bin/chromium (``./dev test`` installs it when run as root with
apt-get; Playwright's own browser download is not used). ``HFEDIT_UI_SCREENSHOT=docs/ui.png``
saves a screenshot of the page after the edit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hfedit.config import HfeditConfig
from hfedit.data.images import save_png
from hfedit.models.backbone import save_backbone
from hfedit.models.checkpoint import save_rectifier
from hfedit.models.rectifier import build_rectifier
from tests.conftest import perturbed, real_faces
from tests.servers import free_port, stop, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# The probe's flags: without the background-networking ones Chromium keeps dialling out, and
# this machine's closed network refuses every try.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS, SEED = 4, 3
MAX_UPLOAD_MB = 1

NO_BROWSER = ("no browser: Debian's chromium is not at /usr/bin/chromium (./dev test installs it "
              "when run as root with apt-get; else `apt-get install chromium`)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, random_denoiser):
    """A models folder as ``./dev run`` leaves it (random backbone, perturbed edit rectifiers;
    ``smiling`` records its CLIP model and texts as train_edits does), a face, and an empty
    folder the app runs in."""
    folder = tmp_path_factory.mktemp("app")
    models = folder / "models"
    save_backbone(random_denoiser, models / "backbone")
    cfg = HfeditConfig().rectifier
    for seed, name in enumerate(("smiling", "old")):
        rect = perturbed(build_rectifier(cfg, random_denoiser.unet), scale=0.2, seed=seed)
        meta = {"attribute": name}
        if name == "smiling":
            meta.update(clip={"model": "ViT-S-32", "weights": "", "semantic": False},
                        edit={"source": "a face", "target": "a smiling face"})
        save_rectifier(models / "edits" / name, rect, meta)
    save_png(real_faces(1)[0], folder / "face.png")
    (folder / "run").mkdir()
    return folder


def _env(omp_threads: str | None = None) -> dict:
    """The app's thread count comes from its --threads alone (torch's default here would be
    every core); the CLI's from OMP_NUM_THREADS, as a user sets it. CPU convolutions round
    differently with another count, so both run with one."""
    env = {**os.environ, "HFEDIT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if omp_threads:
        env["OMP_NUM_THREADS"] = omp_threads
    return env


@pytest.fixture(scope="module")
def app(site):
    """``python -m pipelines.app`` on a free loopback port, run in an empty folder with its
    cache in ``site/cache``; stopped by its PID."""
    port, log = free_port(), site / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.app", "--models", str(site / "models"), "--port",
             str(port), "--threads", "1", "--cache", str(site / "cache"), "--max-upload-mb",
             str(MAX_UPLOAD_MB)], cwd=site / "run", env=_env(), stdout=out,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/api/info", proc, log, timeout=180)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip(NO_BROWSER)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM),
            headless=True, args=CHROMIUM_ARGS, accept_downloads=True,
            viewport={"width": 1180, "height": 640})
        try:
            yield context
        finally:
            context.close()


def _open(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('attribute').options.length > 0")
    return page


def _settings(page, attribute="folder:smiling"):
    page.select_option("#attribute", attribute)
    page.fill("#steps", str(STEPS))
    page.fill("#skip", "0")
    page.fill("#seed", str(SEED))


def _pixels(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_an_edit_in_the_page_is_the_clis_edit_byte_for_byte(site, app, browser, tmp_path):
    cli = subprocess.Popen(  # meanwhile, the same edit on the command line
        [sys.executable, "-m", "hfedit", "edit", str(site / "face.png"), "--attribute", "smiling",
         "--steps", str(STEPS), "--seed", str(SEED), "--backbone", str(site / "models/backbone"),
         "--edits", str(site / "models/edits"), "--out", str(tmp_path / "cli"), "--no-progress"],
        cwd=tmp_path, env=_env(omp_threads="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    page = _open(browser, app)
    page.set_input_files("#file", str(site / "face.png"))
    _settings(page)
    page.click("#run")
    page.wait_for_selector("#download:not([hidden])", timeout=120_000)
    assert page.text_content("#status") == "Done."
    assert page.get_attribute("#progress", "value") == "1"
    with page.expect_download() as waiting:
        page.click("#download")
    download = waiting.value
    assert download.suggested_filename == "face_smiling.png"
    by_page = Path(download.path()).read_bytes()

    out, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, out[-3000:]
    by_cli = (tmp_path / "cli" / "face_smiling.png").read_bytes()
    assert np.array_equal(_pixels(by_page), _pixels(by_cli))  # one code path: the same pixels
    assert by_page == by_cli  # and the same PNG file

    # source and reconstruction as shown: the replay of edit-friendly maps is the input
    shown = {n: page.request.get(app + page.get_attribute(f"#{n}", "src")).body()
             for n in ("source", "reconstruction")}
    assert np.array_equal(_pixels(shown["source"]), _pixels(shown["reconstruction"]))
    assert np.abs(_pixels(by_page) - _pixels(shown["source"])).mean() > 1  # the edit moved it
    cells = [c.strip() for c in page.locator("#metrics tbody td").all_text_contents()]
    assert cells[:4] == ["reconstruction", "0.0000", "1.0000", "100.00"]
    assert cells[5] == "edit" and float(cells[6]) > 0.01 and cells[9] not in ("", "—")
    assert "random CLIP weights: not semantic" in page.text_content("#notes")
    if os.environ.get("HFEDIT_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["HFEDIT_UI_SCREENSHOT"], full_page=True)
    page.close()


def test_bad_uploads_are_refused_with_the_fix(site, app, browser, tmp_path):
    page = _open(browser, app)
    _settings(page, "folder:old")
    data = (site / "face.png").read_bytes()
    cases = {"half.png": (data[: len(data) // 2], ["half.png", "truncated", "Fix:",
                                                   "copy it again"]),
             "notes.png": (b"not an image, only text\n" * 20, ["notes.png", "not an image",
                                                               "Fix:"])}
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        page.set_input_files("#file", str(tmp_path / name))
        page.click("#run")
        page.wait_for_function(f"document.getElementById('error').textContent.includes('{name}')")
        message = page.text_content("#error")
        assert all(text in message for text in expected), message
        assert str(site) not in message  # the page names the upload, not the cache path
    big = tmp_path / "big.png"
    big.write_bytes(data + bytes(2 * MAX_UPLOAD_MB * 2**20))
    page.set_input_files("#file", str(big))  # refused in the page, before any upload
    assert "big.png is 2.0 MB; the limit is 1.0 MB" in page.text_content("#error")
    page.click("#run")
    assert "big.png is 2.0 MB; the limit is 1.0 MB" in page.text_content("#error")
    sent = page.request.post(app + "/api/jobs?attribute=folder:old&num_steps=4&skip=0&seed=0",
                             data=big.read_bytes())  # and by the server, past the page
    assert sent.status == 413 and "--max-upload-mb" in sent.json()["error"]
    page.close()
    # refused uploads leave nothing behind; the app wrote nowhere but its cache
    left = sorted(p.name for p in (site / "cache" / "jobs").rglob("*") if p.is_file())
    assert set(left) <= {"source.png", "reconstruction.png", "edit.png"}, left
    assert list((site / "run").iterdir()) == []


def test_several_tabs_queue_and_all_finish(site, app, browser):
    pages = [_open(browser, app) for _ in range(3)]
    for i, page in enumerate(pages):
        _settings(page, "folder:old")
        page.select_option("#bundled", str(i))  # a bundled face each
    for page in pages:
        page.click("#run")
    for page in pages:
        page.wait_for_selector("#download:not([hidden])", timeout=120_000)
        assert page.text_content("#error") == ""
    names = [page.get_attribute("#download", "download") for page in pages]
    assert names == ["matplotlib_grace_hopper_old.png", "skimage_astronaut_old.png",
                     "skimage_lfw_subset_000_old.png"]
    info = json.loads(urllib.request.urlopen(app + "/api/info", timeout=10).read())
    assert [a["id"] for a in info["attributes"]] == ["folder:old", "folder:smiling"]
    for page in pages:
        page.close()


def test_help_lists_the_flags():
    run = subprocess.run([sys.executable, "-m", "pipelines.app", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for flag in ("--models", "--registry", "--host", "--port", "--cache", "--max-upload-mb",
                 "--max-queue", "--threads"):
        assert flag in run.stdout
    assert "127.0.0.1" in run.stdout
