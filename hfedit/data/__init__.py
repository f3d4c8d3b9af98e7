"""Images in and out: strict decoding with integrity checks (a reason code and a fix for every
refusal), the sources prepare reads (folders, bundled faces), the manifest and the seeded split
into roles, the prepared dataset (uint8 Parquet shards read per batch), the batch job's
manifest and image grids. Decoding runs in worker processes that must not load torch: only the
functions that make tensors import it, and :mod:`hfedit.data.parquet` imports nothing but numpy
(pyarrow when it reads). Of hfedit it imports only :mod:`hfedit.config`, :mod:`hfedit.files`,
:mod:`hfedit.storage` and :mod:`hfedit.progress`;
never :mod:`hfedit.models`, :mod:`hfedit.diffusion`, :mod:`hfedit.editing`,
:mod:`hfedit.training`, :mod:`hfedit.evaluation`, nor ray, mlflow or dvc.
"""
