"""Measuring: image metrics ``(reference, result) -> Tensor[B]``, face identity, the
reconstruction study (DDIM vs edit-friendly, backbone vs rectifier, the noise MSE and the
posterior-mean gap), edit strength and fidelity, and the report tables the evaluate stage
writes. Reads models and images it is given; writes no files except where a function says so.
Never imports ray, mlflow or dvc.
"""
