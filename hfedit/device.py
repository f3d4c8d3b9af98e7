"""One device and one precision policy for every stage, the CLI and every Ray worker.

``runtime.device``: ``auto`` (the first CUDA device when this process sees one, else the CPU),
``cpu``, ``cuda`` or ``cuda:<i>``. ``runtime.precision``: ``fp32``, ``bf16`` or ``fp16``: the
U-Net and hypernetwork passes run under :func:`torch.autocast` with that dtype, everything else
(schedules, inversion maps, losses, optimiser state, metrics) stays float32. The denoiser
returns float32 noise estimates whatever the precision (:class:`hfedit.models.backbone.Denoiser`), so
edit-friendly maps are computed in float32 from whatever the model predicted, and a replay
through the same model reproduces the input exactly under every precision.

Which precision is allowed for which work is :data:`ALLOWED`; :func:`check_precision` enforces
it with a message naming the setting (``benchmarks/precision.py`` compares the precisions).
"""

from __future__ import annotations

import contextlib
import re
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is resolved: the config (and prepare's
    import torch   # processes, which read it) need no torch


class Precision(str, Enum):
    """Autocast dtype of the network passes; ``fp32`` = no autocast."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


class DeviceUnavailable(RuntimeError):
    """``runtime.device`` names a device this process cannot use."""


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# work -> precisions allowed for it. Training: fp32 and bf16, whose rectifier gradient points
# where fp32's does (tests/test_device.py checks the cosine); not fp16, whose gradient direction
# is further off and whose 5 exponent bits would need loss scaling, which hfedit's step
# functions do not do. Editing and evaluation take all three: the maps stay float32, so
# reconstruction is exact under every precision.
ALLOWED = {
    "training": (Precision.fp32, Precision.bf16),
    "editing": (Precision.fp32, Precision.bf16, Precision.fp16),
    "evaluation": (Precision.fp32, Precision.bf16, Precision.fp16),
}


def check_device_spec(spec: str) -> str:
    """``spec`` when it is ``auto | cpu | cuda | cuda:<i>``, else a ValueError naming it."""
    if not isinstance(spec, str) or not _DEVICE.fullmatch(spec.strip()):
        raise ValueError(f"runtime.device={spec!r}: expected auto, cpu, cuda or cuda:<index>")
    return spec.strip()


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device ``spec`` means in this process.

    ``auto`` is CUDA when this process sees a CUDA device (inside a Ray worker: when Ray gave it
    one), else the CPU. ``cuda``/``cuda:<i>`` raise :class:`DeviceUnavailable` when there is no
    such device, rather than quietly running on the CPU.
    """
    import torch

    spec = check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"runtime.device={spec!r} but this process sees no CUDA device "
            "(torch.cuda.is_available() is False): set runtime.device=auto or cpu "
            "(--device auto|cpu on the command line)")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceUnavailable(f"runtime.device={spec!r} but only {count} CUDA device(s) are "
                                f"visible: pick cuda:0 .. cuda:{count - 1} or auto")
    return device


def wants_gpu(spec: str, cluster_gpus: float) -> bool:
    """Whether Ray workers should ask for GPUs: ``cuda*`` always (an error when the cluster has
    none), ``auto`` when the cluster has any, ``cpu`` never."""
    spec = check_device_spec(spec)
    if spec == "cpu":
        return False
    if spec == "auto":
        return cluster_gpus > 0
    if cluster_gpus <= 0:
        raise DeviceUnavailable(
            f"runtime.device={spec!r} but the Ray cluster has no GPUs: set runtime.device=auto "
            "or cpu, or add GPU nodes")
    return True


def check_precision(precision: Precision | str, work: str, device: torch.device) -> Precision:
    """``precision`` as a :class:`Precision` when it is allowed for ``work`` (training,
    editing, evaluation) on ``device``; else a ValueError naming the setting."""
    precision = Precision(precision)
    if precision not in ALLOWED[work]:
        allowed = ", ".join(p.value for p in ALLOWED[work])
        raise ValueError(f"runtime.precision={precision.value} is not allowed for {work} "
                         f"(allowed: {allowed}); see docs/devices.md")
    return precision


def placement(spec: str, precision: Precision | str, work: str) -> tuple[torch.device, Precision]:
    """``(device, precision)`` for ``work`` in this process from ``runtime.device`` /
    ``runtime.precision``: what every stage, task and actor calls first."""
    device = resolve_device(spec)
    return device, check_precision(precision, work, device)


def autocast(device: torch.device | str, precision: Precision | str):
    """:func:`torch.autocast` for ``precision`` on ``device``'s type; a no-op for fp32."""
    import torch

    precision = Precision(precision)
    if precision is Precision.fp32:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=precision.dtype)


__all__ = ["ALLOWED", "DeviceUnavailable", "Precision", "autocast", "check_device_spec",
           "check_precision", "placement", "resolve_device", "wants_gpu"]


def allotted_cpus() -> tuple[int, str]:
    """The CPUs this process was given, and where that number comes from: ``OMP_NUM_THREADS``
    when set (Ray sets it to a task's or actor's ``num_cpus``), else the cgroup's CPU quota when
    one is set (a container), else the CPUs of this process's affinity mask."""
    import math
    import os

    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            return max(1, min(cpus, math.floor(int(quota) / int(period)))), "the cgroup's cpu.max"
    except (OSError, ValueError):
        pass
    return cpus, "the CPU affinity mask"


def set_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads for this process: ``requested`` when positive
    (``runtime.torch_threads``), else the CPUs it was allotted (:func:`allotted_cpus`), so that
    processes sharing a machine (stages beside Ray workers, several tasks) do not each spin as
    many threads as the machine has cores. Logs the choice; returns the count."""
    import logging

    import torch

    count, why = (requested, "runtime.torch_threads") if requested > 0 else allotted_cpus()
    torch.set_num_threads(count)
    logging.getLogger(__name__).info("torch threads: %d (%s)", count, why)
    return count
