"""Self-describing checkpoints: safetensors tensors + a JSON sidecar; nothing is unpickled.

A checkpoint ``name`` in ``folder`` is two files:
  ``name.safetensors``: flat ``{key: tensor}``;
  ``name.json``: the config needed to rebuild, the library versions, and any scalars.
Optimizer state (tensors + nested scalars) is flattened into both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

# the one atomic writer (also imported from here by the pipelines)
from hfedit.files import atomic_write, atomic_write_json

FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the packages a checkpoint depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("hfedit", "torch", "diffusers", "open_clip_torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-serialisable object (configs, input digests)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def module_digests(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``{module: digest of its source file}``: part of a run's fingerprint, so that a result is
    never reused across a change of the code that computes it."""
    import importlib

    return {name: file_digest(importlib.import_module(name).__file__) for name in names}


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def save_checkpoint(folder: str | Path, name: str, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write ``name.safetensors`` then ``name.json`` (the JSON last: its presence marks a
    complete checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file(contiguous, tmp))
    full_meta = {"format_version": FORMAT_VERSION, "versions": versions(), **meta,
                 "data_bytes": data.stat().st_size, "data_sha256": file_digest(data)}
    atomic_write_json(folder / f"{name}.json", full_meta)


def checkpoint_complete(folder: str | Path, name: str) -> bool:
    """Whether ``folder`` holds a whole checkpoint ``name``: both files, the JSON readable and the
    tensors' size and sha256 those the JSON recorded (a copy interrupted half-way is refused;
    checkpoints written before the digest was recorded pass on the files alone)."""
    folder = Path(folder)
    if not has_checkpoint(folder, name):
        return False
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return False
    data = folder / f"{name}.safetensors"
    if "data_bytes" in meta and data.stat().st_size != meta["data_bytes"]:
        return False
    return "data_sha256" not in meta or file_digest(data) == meta["data_sha256"]


def load_checkpoint(folder: str | Path, name: str, device: str = "cpu") -> Checkpoint:
    folder = Path(folder)
    meta_path, data_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_path.is_file() or not data_path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{name}' not found in {folder}: need {data_path.name} and {meta_path.name}"
        )
    meta = json.loads(meta_path.read_text())
    return Checkpoint(tensors=load_file(str(data_path), device=device), meta=meta)


def has_checkpoint(folder: str | Path, name: str) -> bool:
    folder = Path(folder)
    return (folder / f"{name}.json").is_file() and (folder / f"{name}.safetensors").is_file()


# ---------------------------------------------------------------------- optimizer state
def flatten_optimizer(state_dict: dict, prefix: str = "optim.") -> tuple[dict[str, Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON scalars."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict, prefix: str = "optim.") -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        idx, key = name[len(prefix):].split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, per_param in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(per_param)
    return {"state": state, "param_groups": meta["param_groups"]}


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def model_reference(source: str | Path, local: str | Path | None = None) -> dict[str, str]:
    """What a checkpoint records of the model it was trained from, portably: a hub id as is; a
    local folder by its path relative to the project when inside it (else its name only, never
    an absolute path of the training machine) and the sha256 prefix of its weights
    (``unet/diffusion_pytorch_model.safetensors``, or a rectifier's ``rectifier.safetensors``);
    a folder on a store by its URI, digested from this machine's copy (``local`` when the caller
    holds it already, else fetched or checked against the store's listing)."""
    from hfedit.config import project_root
    from hfedit.storage import is_uri, local_copy

    if is_uri(source):
        return {**model_reference(local or local_copy(source)), "source": str(source)}
    path = Path(str(source))
    if not path.exists():
        return {"source": str(source)}
    path = path.resolve()
    try:
        shown = str(path.relative_to(project_root().resolve()))
    except ValueError:
        shown = path.name
    ref = {"source": shown}
    for weights in ("unet/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors",
                    f"{RECTIFIER}.safetensors"):
        if (path / weights).is_file():
            ref["sha256"] = file_digest(path / weights)
            break
    return ref


# ---------------------------------------------------------------------- rectifier files
RECTIFIER = "rectifier"


def save_rectifier(folder: str | Path, rectifier, meta: dict | None = None,
                   base: str | Path | None = None) -> None:
    """``folder/rectifier.safetensors`` + ``folder/rectifier.json`` (its RectifierConfig, the
    target convs and kernel shapes, and ``meta``: backbone, step, fingerprint, ...).

    ``base``: the folder of the rectifier whose shared parameters (trunk and time MLP,
    :data:`hfedit.models.rectifier.SHARED_PREFIXES`) this one kept frozen: they are not written, and the
    JSON records ``base`` (its path relative to ``folder`` and its digest) to load them from."""
    from hfedit.config import to_flat_dict
    from hfedit.models.rectifier import SHARED_PREFIXES

    info = {
        "rectifier_config": to_flat_dict(rectifier.cfg),
        "target_names": list(rectifier.target_names),
        "kernel_shapes": [list(s) for s in rectifier.kernel_shapes],
        **(meta or {}),
    }
    tensors = rectifier.state_dict()
    if base is not None:
        base = Path(base)
        base_tensors = load_checkpoint(base, RECTIFIER).tensors
        shared = {k: v for k, v in tensors.items() if k.startswith(SHARED_PREFIXES)}
        changed = [k for k, v in shared.items() if not torch.equal(v.cpu(), base_tensors[k])]
        if changed:
            raise ValueError(f"save_rectifier: {len(changed)} shared tensors (e.g. {changed[0]}) "
                             f"differ from the base rectifier in {base}; train with the trunk "
                             "frozen (share_trunk) or save without base")
        tensors = {k: v for k, v in tensors.items() if k not in shared}
        info["base"] = {"path": os.path.relpath(base.resolve(), Path(folder).resolve()),
                        "sha256": file_digest(base / f"{RECTIFIER}.safetensors"),
                        "shared": list(SHARED_PREFIXES)}
    save_checkpoint(folder, RECTIFIER, tensors, info)


def load_rectifier(folder: str | Path, unet, device: str = "cpu", base: str | Path | None = None):
    """Rebuild the rectifier saved in ``folder`` for this backbone's ``unet`` and load it.

    Returns ``(rectifier, meta)``; refuses a checkpoint whose targets differ from what the
    config finds in this backbone (a rectifier belongs to one backbone architecture). A
    rectifier saved with a base (:func:`save_rectifier`) takes its shared parameters from
    ``base``, by default the folder its JSON names (relative to ``folder``), after checking
    the digest."""
    from omegaconf import OmegaConf

    from hfedit.config import RectifierConfig
    from hfedit.models.rectifier import build_rectifier

    ck = load_checkpoint(folder, RECTIFIER, device=device)
    nested = OmegaConf.from_dotlist([f"{k}={v}" for k, v in ck.meta["rectifier_config"].items()])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RectifierConfig), nested))
    rectifier = build_rectifier(cfg, unet)
    if list(rectifier.target_names) != ck.meta["target_names"]:
        raise ValueError(
            f"rectifier in {folder} was trained for other target convs than this backbone has "
            f"({len(ck.meta['target_names'])} vs {rectifier.num_targets}); retrain it for this backbone"
        )
    tensors = ck.tensors
    if "base" in ck.meta:
        ref = ck.meta["base"]
        base_dir = Path(base) if base is not None else Path(folder) / ref["path"]
        data = base_dir / f"{RECTIFIER}.safetensors"
        if not data.is_file() or file_digest(data) != ref["sha256"]:
            found = "missing" if not data.is_file() else f"sha256 {file_digest(data)}"
            raise FileNotFoundError(
                f"rectifier in {folder} shares its trunk with the reconstruction rectifier "
                f"{ref['path']} (sha256 {ref['sha256']}), which is {found} at {base_dir}: keep "
                "models/rectifier beside models/edits as the pipeline wrote them, or retrain the "
                "edits (train_edits) for the rectifier you have")
        shared = {k: v for k, v in load_file(str(data), device=device).items()
                  if k.startswith(tuple(ref["shared"]))}
        tensors = {**shared, **tensors}
    rectifier.load_state_dict(tensors)
    return rectifier.eval(), ck.meta
