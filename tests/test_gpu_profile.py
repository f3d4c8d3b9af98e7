"""benchmarks/gpu_profile.py runs its whole table on the CPU at a reduced size, so the script a
GPU session runs once is known to work, and its built-in checks hold."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_profile import profile
from hfedit.device import Precision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_gpu_profile_table_on_the_cpu():
    rows = profile(torch.device("cpu"), 32, [Precision.fp32, Precision.bf16], steps=2, repeats=1)
    cases = {(r["case"], r["B"], r["precision"]) for r in rows}
    for p in ("fp32", "bf16"):
        assert {("plain U-Net forward", b, p) for b in (1, 2)} <= cases
        assert ("edit-training step (checkpointed)", 1, p) in cases
    assert all(r["ms"] > 0 for r in rows)
    for p in ("fp32", "bf16"):
        by = {r["case"]: r for r in rows if r["precision"] == p}
        # the edit replays exactly under every precision
        assert by["EF inversion + edit, N=2, per image"]["max_error"] <= 1e-5
        # checkpointing keeps fewer activations than the plain training step
        assert (by["edit-training step (checkpointed)"]["activations_mib"]
                < by["edit-training step"]["activations_mib"])
