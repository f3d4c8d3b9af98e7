"""Composition for inference: invert a batch of images once and replay it through the backbone
modulated by one rectifier per attribute (:class:`~hfedit.editing.editor.Editor`), the B x K
samples in one batch (:mod:`hfedit.editing.joint`); also SDEdit through a rectified model.
Every front end (CLI, Ray Data job, evaluation, serving) edits through it. Imports torch and,
of hfedit, :mod:`hfedit.config`, :mod:`hfedit.diffusion` and :mod:`hfedit.models` only; never
:mod:`hfedit.training`, :mod:`hfedit.evaluation`, :mod:`hfedit.data`, nor ray, mlflow or dvc.
"""
