"""The batch editing job's manifest: ``<out>/manifest.parquet``, one row per (input, attribute).

Written by the ``edit_batch`` job (:mod:`pipelines.edit_batch`), read by it (what the user
gets) and by the ``evaluate`` stage (its batch summary). Columns (``pipelines.batch_job.COLUMNS``):
``id``, ``attribute``, ``status`` ("ok" or the failure's reason code), ``reason``, ``message``,
``input``, ``output``, ``seed``, ``l1``, ``ssim``, ``max_error`` (NaN where not measured), the
stage timings, ``run``, ``worker_pid``, ``fingerprint`` and ``signature``. Not to be confused
with the prepared dataset's ``manifest.json`` (:mod:`hfedit.data.manifest`).
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.parquet"  # the file's name in the job's output folder


def read_manifest(out: str | os.PathLike):
    """The manifest of the batch job that wrote to ``out`` (a folder or a URI), as a pandas
    DataFrame typed as the file is. Raises FileNotFoundError when ``out`` holds none."""
    import io

    import pandas as pd

    from hfedit.storage import Location, is_uri

    if is_uri(out):
        return pd.read_parquet(io.BytesIO(Location(out).read_bytes(MANIFEST)))
    return pd.read_parquet(Path(out) / MANIFEST)
