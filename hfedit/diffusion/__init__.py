"""Time-stepping, as pure tensor functions over any ``eps = denoiser(x_t, t)``.

Owns the DDPM schedule and its per-step Gaussian quantities (built in float64,
:mod:`~hfedit.diffusion.schedule`), edit-friendly DDPM inversion and its replay, DDIM inversion
and sampling (:mod:`~hfedit.diffusion.inversion`), and ancestral sampling with fresh noise:
generation and SDEdit (:mod:`~hfedit.diffusion.sampling`). Knows no network class and no
rectifier: a denoiser is any callable. Imports torch only: never diffusers, ray, mlflow, dvc,
nor any other hfedit subpackage or module.
"""
