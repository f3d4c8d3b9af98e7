"""Row-group reads of the prepared dataset's Parquet shards, importable without torch: Ray Data
read tasks run this and nothing else of hfedit (see ``pipelines.ray_runtime.split_dataset``)."""

from __future__ import annotations

import numpy as np


def read_groups(batch: dict, files: list[str], filesystem=None) -> dict:
    """For each item of ``batch`` (columns ``shard``, ``group``, ``rows``): rows ``rows`` of
    row group ``group`` of ``files[shard]`` -> ``{"pixels": [bytes, ...]}`` in item order."""
    import pyarrow.parquet as pq

    pixels = []
    for shard, group, rows in zip(batch["shard"], batch["group"], batch["rows"]):
        f = pq.ParquetFile(files[int(shard)], filesystem=filesystem)
        col = f.read_row_group(int(group), columns=["pixels"]).column("pixels")
        pixels.extend(col[int(r)].as_py() for r in rows)
    return {"pixels": np.array(pixels, dtype=object)}
