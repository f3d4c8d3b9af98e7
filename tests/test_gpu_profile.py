"""benchmarks/gpu_profile.py runs its whole table on the CPU at a reduced size, so the script a
GPU session runs once is known to work, and its built-in checks hold.

fp32 only: the same rows under bf16 take about 13x as long on this project's CPU (no bf16
matrix units: 27 s fp32 against about 350 s for both, ``benchmarks/gpu_profile.py --device cpu
--resolution 32 --steps 2 --repeats 1``); bf16's exact replay and its training gradient are
tests/test_device.py's."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_profile import profile
from hfedit.device import Precision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_gpu_profile_table_on_the_cpu():
    rows = profile(torch.device("cpu"), 32, [Precision.fp32], steps=2, repeats=1)
    cases = {(r["case"], r["B"], r["precision"]) for r in rows}
    assert {("plain U-Net forward", b, "fp32") for b in (1, 2)} <= cases
    assert ("edit-training step (checkpointed)", 1, "fp32") in cases
    assert all(r["ms"] > 0 for r in rows)
    by = {r["case"]: r for r in rows}
    # the edit replays exactly
    assert by["EF inversion + edit, N=2, per image"]["max_error"] <= 1e-5
    # checkpointing keeps fewer activations than the plain training step
    assert (by["edit-training step (checkpointed)"]["activations_mib"]
            < by["edit-training step"]["activations_mib"])
