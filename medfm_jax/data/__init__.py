"""Input data: embedded phantoms, real-image sources (folder, manifest, DICOM, TFDS), numpy
transforms, the data config resolved once (``DataSpec``) and the grain pipelines built from it."""
from medfm_jax.data.decode import WINDOW_PRESETS, DataError
from medfm_jax.data.phantoms import FINDINGS, MODALITIES, PhantomSource
from medfm_jax.data.pipeline import make_eval_batches, make_source, make_train_iterator
from medfm_jax.data.sources import FileSource, TfdsSource
from medfm_jax.data.spec import DataSpec, resolve
from medfm_jax.data.transforms import MultiCropSpec

__all__ = ["DataError", "DataSpec", "FINDINGS", "FileSource", "MODALITIES", "MultiCropSpec",
           "PhantomSource", "TfdsSource", "WINDOW_PRESETS", "make_eval_batches", "make_source",
           "make_train_iterator", "resolve"]
