"""CLIP and the directional CLIP loss that trains the edit rectifiers (ALGORITHMS.md section 4).

StyleGAN-NADA's directional loss (paper eq. 4), per image::

    L_dir(x_tar; x_src) = 1 - cos( E_I(x_tar) - E_I(x_src),  E_T(t_tar) - E_T(t_src) )

E_I, E_T are CLIP's image and text encoders. As in StyleGAN-NADA's code, every embedding is
L2-normalised before the differences are taken, and the text direction is normalised too (which
the cosine ignores). A zero image direction (x_tar == x_src) has cosine 0, hence loss 1
(:func:`directional_loss` damps directions shorter than float noise).

Weights (``ClipConfig.weights``): an open_clip pretrained tag (needs the network or a filled HF
cache), a local state-dict file, or nothing: then the model has seeded random weights, which is
what the offline ``tiny`` profile gets; that is announced with a warning and a log line, and
:attr:`ClipModel.semantic` is False so the pipeline can tag its runs. Nothing here downloads
unless a tag is configured.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from hfedit.config import ClipConfig

log = logging.getLogger(__name__)

Texts = Union[str, Sequence[str]]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RANDOM_NOTE = "CLIP has random weights: edits are not semantic"
# What the stages say (log, MLflow tags, reports) when they train or score with random CLIP.
NOT_SEMANTIC = ("edits are not semantic: CLIP has random weights (clip.weights=''); set "
                "clip.weights to an open_clip tag or a local weights file for real edits")


class ClipWeightsError(RuntimeError):
    """CLIP weights that cannot be found or loaded; the message names ``clip.weights``."""


class RandomClipWarning(UserWarning):
    """Issued when CLIP is built with random weights (the directional loss is not semantic)."""


class ClipModel(nn.Module):
    """A frozen open_clip model + tokenizer, taking images in [-1, 1].

    ``encode_image`` is differentiable with respect to its input (the weights are frozen);
    ``encode_text`` runs without gradients. Both return unit-norm embeddings, shape (N, D).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, semantic: bool, weights_note: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.semantic = semantic
        self.weights_note = weights_note
        pcfg = model.visual.preprocess_cfg
        size = pcfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(pcfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pcfg["std"]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ClipModel":
        """CLIP stays in eval mode whatever its parent module does."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable CLIP preprocessing, mirroring open_clip's eval transform.

        (B, 3, H, W) in [-1, 1] -> x = (images + 1) / 2 in [0, 1] (not clipped, so gradients
        pass everywhere) -> bicubic resize with antialias so the image covers the model's
        ``image_size`` (shortest side, aspect kept) -> centre crop -> (x - mean) / std.
        Returns (B, 3, *image_size).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        th, tw = self.image_size
        x = (images.to(self.mean.dtype) + 1) / 2  # (B, 3, H, W) in [0, 1]
        h, w = x.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw]  # (B, 3, th, tw)
        return (x - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """E_I: (B, 3, H, W) in [-1, 1] -> (B, D) unit-norm embeddings."""
        return F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """E_T: N strings -> (N, D) unit-norm embeddings (no gradients)."""
        tokens = self.tokenizer(list(texts)).to(self.device)  # (N, context_length)
        return F.normalize(self.model.encode_text(tokens), dim=-1)


# ------------------------------------------------------------------------------------ loading
def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith(WEIGHT_SUFFIXES) or Path(weights).is_file()


def _known_tags(name: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(name))


class _QuietRandomInit(logging.Filter):
    """Drops open_clip's own "No pretrained weights loaded" (a root-logger warning per load):
    :func:`load_clip` says it once, with the setting to change."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def load_clip(cfg: ClipConfig, device: Union[str, torch.device] = "cpu",
              announce: bool = True) -> ClipModel:
    """Build the open_clip model ``cfg.model`` with the weights ``cfg.weights`` says.

    - ``weights`` = "" : seeded random init (``cfg.seed``, without touching the global RNG);
      warns :class:`RandomClipWarning` and logs "CLIP has random weights: edits are not
      semantic" (``announce=False``: not, for a caller that has said it once already, e.g. a
      stage's Ray tasks after its driver); ``semantic=False``. Refused when
      ``cfg.allow_random`` is false.
    - a path (has a separator or ends in .safetensors/.bin/.pt/.pth): open_clip's
      ``load_checkpoint`` reads it (safetensors for .safetensors, else
      ``torch.load(weights_only=True)``: no code is unpickled) and loads it strictly.
    - otherwise an open_clip pretrained tag ("openai", ...), fetched through the HF hub cache.

    Raises :class:`ClipWeightsError` naming ``clip.weights`` when the weights cannot be had.
    """
    import open_clip

    if open_clip.get_model_config(cfg.model) is None:
        raise ClipWeightsError(
            f"clip.model='{cfg.model}' is not an open_clip model (e.g. ViT-B-32, RN50, ViT-S-32)"
        )
    weights = cfg.weights.strip()
    if not weights:
        if not cfg.allow_random:
            raise ClipWeightsError(
                f"clip.weights is empty and clip.allow_random is false: set clip.weights to an "
                f"open_clip tag for {cfg.model} (known: {_known_tags(cfg.model)[:4]}; needs "
                f"the network) or to a local .safetensors/.bin state dict"
            )
        quiet = _QuietRandomInit()
        logging.getLogger().addFilter(quiet)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = open_clip.create_model(cfg.model, pretrained=None)
        finally:
            logging.getLogger().removeFilter(quiet)
        semantic, note = False, f"{RANDOM_NOTE} (random init, seed {cfg.seed}; clip.weights='')"
        if announce:
            warnings.warn(note, RandomClipWarning, stacklevel=2)
            log.warning(note)
    elif _looks_like_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ClipWeightsError(f"clip.weights='{weights}': no such file")
        try:
            model = open_clip.create_model(cfg.model, pretrained=str(path), weights_only=True)
        except Exception as err:
            raise ClipWeightsError(
                f"clip.weights='{weights}': cannot load it as open_clip '{cfg.model}' weights "
                f"({type(err).__name__}: {err}); it must be a state dict (.safetensors, or a "
                f".bin/.pt readable by torch.load(weights_only=True)) for that architecture"
            ) from err
        semantic, note = True, f"open_clip {cfg.model} weights from local file {path.resolve()}"
    else:
        tags = _known_tags(cfg.model)
        if weights not in tags:
            raise ClipWeightsError(
                f"clip.weights='{weights}': no such file, and not an open_clip pretrained tag "
                f"for '{cfg.model}' (known tags: {tags})"
            )
        try:
            model = open_clip.create_model(cfg.model, pretrained=weights)
        except Exception as err:
            tag_cfg = open_clip.get_pretrained_cfg(cfg.model, weights)
            repo = (tag_cfg.get("hf_hub") or "?").strip("/")
            reason = str(err).rstrip(".")
            raise ClipWeightsError(
                f"clip.weights='{weights}': cannot fetch the open_clip weights of {cfg.model} "
                f"(HF hub repo '{repo}'): {reason}. Offline? Download the weights file of that "
                f"repo once on a machine with network, then set clip.weights to its local path "
                f"(.safetensors or .bin); or set clip.weights='' for random, non-semantic "
                f"weights. HF_HUB_OFFLINE=1 makes this fail at once instead of retrying."
            ) from err
        semantic, note = True, f"open_clip {cfg.model} pretrained='{weights}'"
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return ClipModel(model, tokenizer, cfg.model, semantic, note).to(device)


# -------------------------------------------------------------------------------------- loss
def directional_loss(
    img_src_emb: torch.Tensor,
    img_tar_emb: torch.Tensor,
    text_dir: torch.Tensor,
    min_norm: float = 1e-4,
) -> torch.Tensor:
    """1 - cos(d_I, d_T) per row, d_I = img_tar_emb - img_src_emb: (B, D), (B, D), (D,) -> (B,).

    cos(d_I, d_T) = <d_I, d_T> / (max(|d_I|, min_norm) |d_T|). Embeddings are used as given
    (``ClipModel`` normalises them). In [0, 2]: 0 when the image moves along the text
    direction, 1 when orthogonal or not moving, 2 when opposite. ``min_norm`` damps image
    directions that are only float noise (encoding the same image twice differs by ~1e-7;
    real edits move unit CLIP embeddings by > 1e-2), so identical images give a loss of ~1
    with bounded gradients instead of the cosine of noise.
    """
    img_dir = img_tar_emb - img_src_emb  # (B, D)
    text_unit = F.normalize(text_dir, dim=-1)  # (D,) or (B, D)
    dot = (img_dir * text_unit).sum(-1)  # (B,)
    return 1.0 - dot / img_dir.norm(dim=-1).clamp_min(min_norm)


def _as_list(texts: Texts) -> list[str]:
    out = [texts] if isinstance(texts, str) else list(texts)
    if not out or not all(isinstance(t, str) and t.strip() for t in out):
        raise ValueError(f"expected a non-empty text or list of texts, got {texts!r}")
    return out


class DirectionalClipLoss(nn.Module):
    """L_dir of paper eq. 4 for one attribute (``source_text`` -> ``target_text``).

    Each text may be a list (prompt templates): its unit embeddings are averaged and
    renormalised. The text direction
    ``d_T = normalize(E_T(target) - E_T(source))`` is computed once here, without gradients,
    and kept as a buffer (moves with ``.to``).
    """

    def __init__(self, clip: ClipModel, source_text: Texts, target_text: Texts):
        super().__init__()
        self.clip = clip
        self.source_text, self.target_text = _as_list(source_text), _as_list(target_text)
        n_src = len(self.source_text)
        emb = clip.encode_text(self.source_text + self.target_text)  # (N_src + N_tar, D), once
        src = F.normalize(emb[:n_src].mean(0), dim=-1)  # (D,)
        tar = F.normalize(emb[n_src:].mean(0), dim=-1)  # (D,)
        direction = tar - src
        if direction.norm() < 1e-6:
            raise ValueError(
                f"source text {self.source_text} and target text {self.target_text} have the "
                f"same CLIP embedding: no edit direction"
            )
        self.register_buffer("text_direction", F.normalize(direction, dim=-1), persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **ctx) -> torch.Tensor:
        """Loss per image, (B,): ``pred`` = edited images x_tar (gradients flow to it),
        ``target`` = source images x_src (treated as constants); both (B, 3, H, W) in [-1, 1]."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        with torch.no_grad():
            src_emb = self.clip.encode_image(target)  # (B, D)
        tar_emb = self.clip.encode_image(pred)  # (B, D)
        return directional_loss(src_emb, tar_emb, self.text_direction)

    def clip_directional_similarity(
        self, x_src: torch.Tensor, x_edit: torch.Tensor
    ) -> torch.Tensor:
        """The editing metric: cos(E_I(x_edit) - E_I(x_src), d_T) per image, (B,), in [-1, 1].

        Metric order ``(reference, result)``: source first. Equals ``1 - forward(x_edit, x_src)``.
        """
        src_emb = self.clip.encode_image(x_src)
        tar_emb = self.clip.encode_image(x_edit)
        return 1.0 - directional_loss(src_emb, tar_emb, self.text_direction)
