"""Frozen features of a (restored or random) encoder, computed sharded over the mesh.

:func:`build_classifier` creates the supervised classifier of the eval config (encoder restored
from ``config.init_from`` when set) directly in its parameter shardings; :func:`extract` runs the
encoder over the first ``n`` examples of a split in global batches split over data x fsdp and
returns pooled features (cls token or mean of patch tokens) and labels as host numpy arrays,
identical on every process. :func:`pixels` gives the same for the flattened input pixels
(``features.input='pixels'``: the raw-pixel floor of a benchmark task).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from medfm_jax.metrics import over_split
from medfm_jax.models import heads
from medfm_jax.train import assemble


def build_classifier(config, mesh):
  """(supervised objective, its params placed in their logical shardings): the run's own
  initial params (``train.assemble``), so a random-init baseline is the trainer's init."""
  d = config.data
  batch = {"image": jax.ShapeDtypeStruct((1, d.image_size, d.image_size, d.channels), jnp.float32)}
  assembly = assemble.assemble(config, mesh, batch)
  return assembly.objective, assembly.init_params()


def apply_over_split(config, mesh, fn, params, split: str, num_examples: int, jitted: bool = False):
  """-> (``fn(params, images)`` rows ``[n, ...]`` as float32 numpy, {label name: int ``[n]``}) over
  the first ``num_examples`` records of ``split`` (unaugmented), in global batches of
  ``features.batch_size`` split over data x fsdp; results replicated to every process. With
  ``jitted``, ``fn`` comes from :func:`jit_replicated` (one compile for several splits)."""
  run = fn if jitted else jit_replicated(fn)
  return over_split.map_over_split(config.data, mesh, lambda batch: run(params, batch["image"]),
                                   split, num_examples, config.features.batch_size)


def jit_replicated(fn):
  """``fn`` jitted with replicated outputs, reusable across :func:`apply_over_split` calls."""
  return jax.jit(fn, out_shardings=PartitionSpec())


def pooled_fn(config, objective):
  """The jitted ``(params, images) -> pooled features`` of ``objective``'s encoder."""
  backbone = objective.model.backbone
  pool = config.features.pool

  def fn(p, images):
    tokens = backbone.apply({"params": objective.effective_params(p)["backbone"]}, images)
    return heads.pool_tokens(tokens, pool, backbone.num_prefix_tokens)

  return jit_replicated(fn)


def extract(config, mesh, objective, params, split: str, num_examples: int, fn=None):
  """Pooled encoder features ``[n, width]`` (``features.pool``: cls | mean) and labels; ``fn``:
  a :func:`pooled_fn` of the same objective, to compile once for several splits."""
  return apply_over_split(config, mesh, fn or pooled_fn(config, objective), params, split,
                          num_examples, jitted=True)


def pixels(config, mesh, split: str, num_examples: int):
  """Flattened normalised input pixels ``[n, H*W*C]`` and labels (no encoder)."""
  return apply_over_split(config, mesh, lambda _, images: images.reshape(images.shape[0], -1),
                          None, split, num_examples)


def tokens_fn(objective):
  """The jitted ``(params, images) -> patch tokens [b, grid, grid, width]`` (prefix tokens dropped)."""
  backbone = objective.model.backbone

  def fn(p, images):
    tokens = backbone.apply({"params": objective.effective_params(p)["backbone"]}, images)
    tokens = tokens[:, backbone.num_prefix_tokens:]
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])

  return jit_replicated(fn)
