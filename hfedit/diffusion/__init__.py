"""Time-stepping, as pure tensor functions over any ``eps = denoiser(x_t, t)``.

Owns the DDPM schedule (built in float64), edit-friendly DDPM inversion and its replay, DDIM
inversion and sampling, ancestral DDPM sampling and SDEdit. Knows no network class and no
rectifier: a denoiser is any callable. Imports torch only (never diffusers, ray, mlflow, dvc,
nor any other hfedit subpackage).
"""
