"""Training as plain step functions: the ``tiny`` profile's DDPM backbone, the rectifier's
reconstruction pretraining (paper eq. 3), per-attribute edit training (Algorithm 1 and the
Markovian baseline), batch augmentation, and the activation-memory probe. Step functions take
tensors, a model and an optimiser and return losses; the loops that drive them (Ray Train, Ray
tasks) and the tracking live in ``pipelines/``. Never imports ray, mlflow or dvc.
"""
