"""Input data: embedded phantoms, numpy transforms and the grain pipeline."""
from medfm_jax.data.phantoms import FINDINGS, MODALITIES, PhantomSource
from medfm_jax.data.pipeline import (make_eval_batches, make_source, make_train_iterator,
                                     multicrop_spec)
from medfm_jax.data.transforms import MultiCropSpec

__all__ = ["FINDINGS", "MODALITIES", "MultiCropSpec", "PhantomSource", "make_eval_batches",
           "make_source", "make_train_iterator", "multicrop_spec"]
