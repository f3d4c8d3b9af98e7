"""The one atomic writer (hfedit/files.py): files get the umask's mode, a failed write leaves the
previous file (or folder) as it was, and only the writer's own temporaries are ever tidied."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

from hfedit.files import atomic_write_bytes, atomic_write_json
from hfedit.models.checkpoint import save_checkpoint
from hfedit import files
from hfedit.files import atomic_write, is_temporary, remove_temporaries


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, mask, mode):
    """The manifest (bytes), the metrics JSON and a rectifier checkpoint were 0600."""
    with umask(mask):
        atomic_write_bytes(tmp_path / "manifest.parquet", b"PAR1")
        atomic_write_json(tmp_path / "metrics.json", {"l1": 0.5})
        save_checkpoint(tmp_path / "rect", "rectifier", {"w": torch.ones(2)}, {"step": 1})
    written = [tmp_path / "manifest.parquet", tmp_path / "metrics.json",
               tmp_path / "rect/rectifier.safetensors", tmp_path / "rect/rectifier.json"]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(mode) for p in written}


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("old"))

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.md"]


def test_only_the_writers_own_temporaries_are_removed(tmp_path):
    def leftover_of(path: Path) -> Path:  # what a writer killed before its rename leaves
        tmp = files._sibling(path)
        tmp.write_bytes(b"partial")
        return tmp

    (tmp_path / "sub").mkdir()
    ours = [leftover_of(tmp_path / "a.png"), leftover_of(tmp_path / "sub" / "b.png")]
    users = [tmp_path / ".notes.tmp", tmp_path / "sub" / ".draft.txt.tmp", tmp_path / "x.tmp",
             tmp_path / ".a.png.12.tmp"]
    for p in users:
        p.write_text("mine")
    assert all(is_temporary(p) for p in ours) and not any(is_temporary(p) for p in users)
    assert sorted(remove_temporaries(tmp_path)) == sorted(ours)
    assert all(p.read_text() == "mine" for p in users) and not any(p.exists() for p in ours)


def test_csvs_and_plots_of_evaluate_are_written_whole(tmp_path):
    """A value that fails half-way through a CSV used to leave a truncated file."""
    from hfedit.evaluation.plots import write_editing_csvs, write_reconstruction_csv

    class Unprintable(float):
        def __str__(self) -> str:
            raise RuntimeError("cannot format")

        __repr__ = __str__

    path = tmp_path / "reconstruction.csv"
    rows = [{"steps": 10, "model": "backbone", "inversion": "ddim", "l1": 0.1}]
    write_reconstruction_csv(rows, path)
    before = path.read_text()
    with pytest.raises(RuntimeError, match="cannot format"):
        write_reconstruction_csv(rows + [{**rows[0], "steps": 50, "l1": Unprintable(0.2)}], path)
    assert path.read_text() == before and before.startswith("steps,")
    write_editing_csvs({"smiling": [{"steps": 10, "l1": 0.1}]}, tmp_path / "editing")
    with pytest.raises(RuntimeError):
        write_editing_csvs({"smiling": [{"steps": 10, "l1": Unprintable(0.2)}]}, tmp_path / "editing")
    assert (tmp_path / "editing/smiling.csv").read_text().splitlines()[1].startswith("10,")
    assert not [p for p in tmp_path.rglob("*") if is_temporary(p)]


def test_the_rectifier_export_replaces_the_folder_whole(tmp_path):
    """The pretraining export deleted its output folder before copying into it."""
    from pipelines.pretrain_rectifier import _export

    out, reported = tmp_path / "rectifier", tmp_path / "checkpoint"
    save_checkpoint(out, "rectifier", {"w": torch.zeros(2)}, {"step": 1})
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    reported.mkdir()
    save_checkpoint(reported, "rectifier", {"w": torch.ones(2)}, {"step": 2})
    (reported / "rectifier.json").unlink()  # a broken checkpoint: the copy fails half-way
    with pytest.raises(FileNotFoundError):
        _export(reported, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    save_checkpoint(reported, "rectifier", {"w": torch.ones(2)}, {"step": 2})
    _export(reported, out)
    assert (out / "rectifier.safetensors").read_bytes() == (reported / "rectifier.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "rectifier"]


@pytest.mark.parametrize("name", ["a" * 251 + ".png", "é" * 125 + ".png", os.fsdecode(b"\xff" * 250) + ".png"])
def test_any_valid_name_can_be_written_its_temporary_stays_under_name_max(tmp_path, name):
    """A name over ~227 bytes failed: the temporary's suffix pushed it past 255 bytes."""
    atomic_write_bytes(tmp_path / name, b"data")
    assert (tmp_path / name).read_bytes() == b"data" and len(os.listdir(tmp_path)) == 1
    tmp = files._sibling(tmp_path / name)
    assert is_temporary(tmp) and len(os.fsencode(tmp.name)) <= 255
