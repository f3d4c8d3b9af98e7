"""Composition: invert a batch of images once and replay it through the backbone modulated by
one rectifier per attribute (:class:`~hfedit.editing.editor.Editor`), the B x K samples in one
batch (:mod:`hfedit.editing.joint`). The only subpackage that joins :mod:`hfedit.diffusion` and
:mod:`hfedit.models`; every front end (CLI, Ray Data job, evaluation, serving) edits through it.
"""
