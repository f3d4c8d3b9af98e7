"""Training as plain step functions: the ``tiny`` profile's DDPM backbone, the rectifier's
reconstruction pretraining (paper eq. 3), per-attribute edit training (Algorithm 1 and the
Markovian baseline), batch augmentation, and the activation-memory probe. Step functions take
tensors, a model and an optimiser and return losses; the loops that drive them (Ray Train, Ray
tasks) and the tracking live in ``pipelines/``. Imports torch and, of hfedit,
:mod:`hfedit.config`, :mod:`hfedit.diffusion`, :mod:`hfedit.models`, :mod:`hfedit.progress` and
the prepared dataset's reader (:class:`hfedit.data.prepared.Split`); never :mod:`hfedit.editing`,
:mod:`hfedit.evaluation`, nor ray, mlflow or dvc.
"""
