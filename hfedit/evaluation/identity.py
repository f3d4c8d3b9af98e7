"""Identity similarity between a source face and its edit (the paper's Table 2 metric).

The paper uses CurricularFace; its weights ship nowhere, so hfedit uses dlib's ResNet face
descriptor (``dlib_face_recognition_resnet_model_v1.dat``, 128-d, shipped with
``face-recognition-models``), which runs offline on the CPU:

    detect (dlib HOG frontal detector) -> 5-point landmarks -> aligned 150x150 chip -> f in R^128
    similarity(ref, res) = cos(f_ref, f_res) = <f_ref, f_res> / (|f_ref| |f_res|)

Reported as a cosine similarity (higher = same identity; the paper's convention too). dlib's own
Euclidean distance |f_ref - f_res| (same person below ~0.6) is given by :meth:`score`.

The HOG detector sees faces of about 80 px and more, so images are upsampled (dlib's
``upsample_num_times``) until a face of ``min_face_px`` would reach 80 px; faces (and images)
smaller than ``min_face_px`` are not scored. Where no face can be scored the value is NaN and a
reason says why: ``"too_small:<side>"`` (the image is smaller than ``min_face_px``) or
``"no_face:<side>"``, side being ``reference`` or ``result``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DETECTOR_MIN_PX = 80  # smallest face dlib's HOG detector finds at upsample 0
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"


def dlib_models_dir() -> Path:
    """The ``models/`` folder of the face-recognition-models package, found without importing
    it (its ``__init__`` imports ``pkg_resources``, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'face_recognition_models' not installed (pip install face-recognition-models)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    for name in (DESCRIPTOR_FILE, LANDMARKS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"dlib model {name} not found in {folder}")
    return folder


@dataclass
class FaceEmbeddings:
    """Descriptors of a batch: (B, 128) float64, NaN rows where ``reasons[i]`` is not None."""

    descriptors: torch.Tensor
    reasons: list[Optional[str]]
    boxes: list[Optional[tuple[int, int, int, int]]]  # (left, top, right, bottom), image pixels


@dataclass
class IdentityScores:
    """Per pair: cosine similarity and Euclidean distance of the descriptors, (B,) each, NaN
    where not applicable, with ``reasons[i]`` saying why (None where scored)."""

    similarity: torch.Tensor
    distance: torch.Tensor
    reasons: list[Optional[str]]


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 RGB, C-contiguous (what dlib takes)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got {tuple(image.shape)}")
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


class IdentityScorer:
    """dlib face identity; callable as a metric ``(reference, result) -> Tensor[B]``.

    ``min_face_px``: the smallest face (detection box width, in image pixels) that is scored.
    """

    def __init__(self, models_dir: str | Path | None = None, min_face_px: int = 40):
        import dlib

        folder = Path(models_dir) if models_dir is not None else dlib_models_dir()
        self.min_face_px = int(min_face_px)
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(folder / LANDMARKS_FILE))
        self._encoder = dlib.face_recognition_model_v1(str(folder / DESCRIPTOR_FILE))

    def _max_upsample(self) -> int:
        """Doublings needed so that a ``min_face_px`` face reaches the detector's 80 px."""
        return max(0, math.ceil(math.log2(DETECTOR_MIN_PX / max(self.min_face_px, 1))))

    def _detect(self, img: np.ndarray):
        """The most confident face box of at least ``min_face_px``, trying upsample 0, 1, ...

        Confidence, not size: the HOG detector's weak false positives can be larger than the
        face (seen on the astronaut image: a 104 px box on the suit, score 0.16 vs 0.98).
        """
        for upsample in range(self._max_upsample() + 1):
            boxes, scores, _ = self._detector.run(img, upsample, 0.0)
            found = [(s, b) for b, s in zip(boxes, scores) if b.width() >= self.min_face_px]
            if found:
                return max(found, key=lambda sb: sb[0])[1]
        return None

    def embed(self, images: torch.Tensor, side: str = "image") -> FaceEmbeddings:
        """Face descriptors of (B, 3, H, W) images in [-1, 1] -> :class:`FaceEmbeddings`."""
        if images.ndim != 4:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        b = images.shape[0]
        out = torch.full((b, 128), math.nan, dtype=torch.float64)
        reasons: list[Optional[str]] = [None] * b
        boxes: list[Optional[tuple[int, int, int, int]]] = [None] * b
        if min(images.shape[-2:]) < self.min_face_px:
            return FaceEmbeddings(out, [f"too_small:{side}"] * b, boxes)
        for i in range(b):
            img = to_uint8_hwc(images[i])
            box = self._detect(img)
            if box is None:
                reasons[i] = f"no_face:{side}"
                continue
            shape = self._landmarks(img, box)  # 5 landmarks
            out[i] = torch.tensor(list(self._encoder.compute_face_descriptor(img, shape)))
            boxes[i] = (box.left(), box.top(), box.right(), box.bottom())
        return FaceEmbeddings(out, reasons, boxes)

    @staticmethod
    def compare(ref: FaceEmbeddings, res: FaceEmbeddings) -> IdentityScores:
        """Scores from precomputed embeddings (embed the sources once, compare many edits)."""
        if ref.descriptors.shape != res.descriptors.shape:
            raise ValueError(
                f"batch sizes differ: {tuple(ref.descriptors.shape)} vs "
                f"{tuple(res.descriptors.shape)}"
            )
        f_ref, f_res = ref.descriptors, res.descriptors  # (B, 128)
        sim = (f_ref * f_res).sum(-1) / (f_ref.norm(dim=-1) * f_res.norm(dim=-1))
        dist = (f_ref - f_res).norm(dim=-1)
        reasons = [a or b for a, b in zip(ref.reasons, res.reasons)]
        return IdentityScores(sim.float(), dist.float(), reasons)

    def score(self, reference: torch.Tensor, result: torch.Tensor) -> IdentityScores:
        """Similarity, distance and reasons for (B, 3, H, W) pairs in [-1, 1]."""
        if reference.shape[0] != result.shape[0]:
            raise ValueError(f"batch sizes differ: {reference.shape[0]} vs {result.shape[0]}")
        return self.compare(self.embed(reference, "reference"), self.embed(result, "result"))

    def similarity(self, reference: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of the face descriptors, (B,), NaN where no face was scored."""
        return self.score(reference, result).similarity

    __call__ = similarity


def identity_scorer(min_face_px: int, resolution: int) -> tuple[Optional[IdentityScorer], str]:
    """``(IdentityScorer, "")`` for images of ``resolution`` px, or ``(None, note)`` with the
    reason when faces cannot be scored: images smaller than ``min_face_px``
    (``edits.ablation.min_face_px``), or dlib or its model files missing."""
    if resolution < min_face_px:
        return None, (f"identity not scored: images are {resolution} px, smaller than "
                      f"edits.ablation.min_face_px={min_face_px} (dlib needs larger faces)")
    try:
        return IdentityScorer(min_face_px=min_face_px), ""
    except Exception as err:  # dlib or its model files missing
        return None, f"identity not scored: {type(err).__name__}: {err}"
