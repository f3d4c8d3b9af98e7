"""The MLflow pyfunc model of a rectifier ("models from code": this file is the model; nothing
is pickled). Logged by :func:`pipelines.serving.log_rectifier_model`; served with

    mlflow models serve -m models:/hfedit-edit-smiling@champion --env-manager local

Artifacts: ``rectifier`` (its ``rectifier.safetensors`` + ``rectifier.json``; none in the
backbone's own model, which reconstructs), for an edit rectifier that shares the reconstruction
rectifier's trunk ``base`` (that rectifier), and ``backbone`` (the diffusers folder) unless the
config links a registered one. Model config: ``attribute`` (the name the edit is replayed
under), ``inversion`` (the defaults of the request's params), ``max_pixels``, and
``backbone_model`` (``models:/<prefix>-backbone/<version>``, fetched from the registry that
``MLFLOW_TRACKING_URI`` names when the model loads) or ``backbone_source`` (a hub id).

Request: one row per image, ``image`` = base64 of the image file (PNG, JPEG, ...: anything the
``prepare`` stage reads), optional ``seed`` (default: the inversion seed). Params (optional):
``num_steps``, ``skip``, ``eta``. Response: one row per image, ``image`` = base64 PNG of the
edit at the backbone's resolution (``width`` x ``height`` given beside it), ``error`` = "" or why
that image was refused (one bad image does not fail the request).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile

import mlflow
from mlflow.pyfunc import PythonModel


class RectifierModel(PythonModel):
    """Invert each image with the backbone, replay it through the rectifier (hfedit.editing.editor)."""

    def load_context(self, context) -> None:
        from hfedit.models.backbone import load_backbone
        from hfedit.models.checkpoint import load_rectifier
        from hfedit.config import InversionConfig
        from hfedit.device import placement

        conf = dict(context.model_config or {})
        device, precision = placement(os.environ.get("HFEDIT_DEVICE", "auto"), "fp32", "editing")
        backbone = context.artifacts.get("backbone")
        if backbone is None and conf.get("backbone_model"):
            # the registered backbone this model links to (only hfedit/ ships with the model,
            # so this is not pipelines.serving.backbone_folder)
            from mlflow.models import Model

            self._download = tempfile.TemporaryDirectory(prefix="hfedit-backbone-")
            local = mlflow.artifacts.download_artifacts(artifact_uri=conf["backbone_model"],
                                                        dst_path=self._download.name)
            flavor = Model.load(local).flavors["python_function"]
            backbone = os.path.join(local, flavor["artifacts"]["backbone"]["path"])
        self.denoiser = load_backbone(backbone or conf["backbone_source"], device, precision)
        self.rectifier = None  # the backbone's own model: reconstruction
        if "rectifier" in context.artifacts:
            self.rectifier, self.meta = load_rectifier(context.artifacts["rectifier"],
                                                       self.denoiser.unet, device=str(device),
                                                       base=context.artifacts.get("base"))
        self.attribute = conf.get("attribute", "edit")
        self.inversion = InversionConfig(**conf.get("inversion", {}))
        self.max_pixels = int(conf.get("max_pixels", 40_000_000))

    def predict(self, context, model_input, params=None):
        import dataclasses

        import pandas as pd

        from hfedit.editing.editor import Editor

        params = params or {}
        inv = dataclasses.replace(self.inversion, **{k: type(getattr(self.inversion, k))(v)
                                                     for k, v in params.items()
                                                     if k in ("num_steps", "skip", "eta")})
        if not 0 <= inv.skip < inv.num_steps:
            raise ValueError(f"params: need 0 <= skip < num_steps, got skip={inv.skip}, "
                             f"num_steps={inv.num_steps}")
        editor = Editor(self.denoiser, inv,
                        {} if self.rectifier is None else {self.attribute: self.rectifier})
        frame = pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError(f"request has columns {list(frame.columns)}; send a column 'image' "
                             "with the base64 of each image file")
        seeds = frame["seed"] if "seed" in frame.columns else [inv.seed] * len(frame)
        rows = []
        for encoded, seed in zip(frame["image"], seeds):
            seed = inv.seed if seed is None or seed != seed else int(seed)  # None / NaN
            try:
                x0 = self._decode(encoded)
            except ValueError as err:
                rows.append({"image": "", "width": 0, "height": 0, "error": str(err)})
                continue
            out = editor.edit(x0.to(self.denoiser.device), [seed], names=(self.attribute,))
            png = _png(out.outputs[self.attribute][0].clamp(-1, 1))
            rows.append({"image": base64.b64encode(png).decode("ascii"),
                         "width": int(x0.shape[-1]), "height": int(x0.shape[-2]), "error": ""})
        return pd.DataFrame(rows, columns=["image", "width", "height", "error"])

    def _decode(self, encoded) -> "torch.Tensor":  # noqa: F821
        """base64 image file -> (1, 3, R, R) in [-1, 1], prepared as the prepare stage does."""
        from hfedit.data.images import ImageError, load_image, to_tensor

        try:
            data = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"'image' is not base64 ({err}): send base64.b64encode(file bytes)")
        with tempfile.NamedTemporaryFile(suffix=".img") as f:
            f.write(data)
            f.flush()
            try:
                loaded = load_image(f.name, self.max_pixels)
            except ImageError as err:
                detail = str(err).replace(f.name, "the image")
                raise ValueError(f"'image' refused ({err.reason}): {detail}") from None
        return to_tensor(loaded.image, self.denoiser.sample_size)[None]


def _png(tensor) -> bytes:
    from hfedit.data.images import to_pil

    buf = io.BytesIO()
    to_pil(tensor.cpu()).save(buf, format="PNG")
    return buf.getvalue()


mlflow.models.set_model(RectifierModel())
