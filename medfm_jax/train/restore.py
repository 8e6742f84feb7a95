"""Restore the image encoder of any pretraining checkpoint into a classifier or feature extractor.

The objective that wrote the checkpoint (``objective.name`` in its saved config: a built-in short
name or an import path) declares where the image encoder lives in the saved train state
(``Objective.image_encoders``): MAE ``params/encoder``; DINO ``extra/teacher/backbone`` (default) or
``params/backbone`` (student); a fine-tuned classifier ``params/backbone``; the CLIP/SigLIP image
tower and the FLAVA image encoder ``params/image``.

This lives in the train layer (it reads checkpoints); objectives get :func:`pretrained_encoder`
handed in as their ``encoder_loader`` (``train.assemble.build_objective``) for ``init_from`` and LiT.

Only that subtree is read. :func:`fit_encoder` matches it to a freshly initialised encoder: learned
position embeddings are resized bicubically to the new grid (fixed sin-cos ones are recomputed by
the model), scanned/unrolled block stacks are converted, new parameter-efficient parameters
(prompts, adapters) keep their fresh init; anything else that does not fit raises one
:class:`CheckpointError` line listing missing/unexpected keys and shape mismatches.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medfm_jax import objectives
from medfm_jax.errors import ConfigError
from medfm_jax.models import layers, vit
from medfm_jax.peft.lora import path_str
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train.checkpoint import CheckpointError

# Encoder architecture fields copied from the checkpoint's config (model.*) into the eval config.
ARCH_FIELDS = ("variant", "width", "depth", "num_heads", "mlp_dim", "pos_embed", "layer_norm_eps",
               "layer_scale_init", "num_registers", "activation", "swiglu", "ln_pre", "patch_embed",
               "cls_pool", "patch_3d")
# Parameters that only pretraining uses (iBOT mask token): dropped without complaint.
PRETRAIN_ONLY = ("mask_token",)
# Parameters a fine-tuning model adds on top of a pretrained encoder: fresh init is expected.
NEW_PEFT_KEYS = ("prompts", "adapter_attn", "adapter_mlp")


def checkpoint_objective(init_from: str) -> tuple[str, dict]:
  """(objective name, saved config dict) of the checkpoint ``init_from`` points to."""
  config = ckpt_lib.read_meta(init_from)["config"]
  name = config.get("objective", {}).get("name")
  if not name:
    raise CheckpointError(f"init_from={init_from!r}: the checkpoint's config names no objective")
  return name, config


def objective_class(name: str, init_from: str) -> type[objectives.Objective]:
  """The class of the objective that wrote checkpoint ``init_from`` (its saved ``objective.name``)."""
  try:
    return objectives.resolve(name)
  except ConfigError as e:
    raise CheckpointError(f"init_from={init_from!r}: the checkpoint's {e}") from None


def encoder_path(objective: str, weights: str, init_from: str) -> tuple[str, ...]:
  """Path of the image encoder in the saved state for ``weights`` ('default' or a tower name)."""
  towers = objective_class(objective, init_from).image_encoders
  if not towers:
    raise CheckpointError(f"init_from={init_from!r}: checkpoints of objective {objective!r} have no "
                          "image encoder (its class declares no image_encoders)")
  default = next(iter(towers))
  name = default if weights in ("", "default") else weights
  if name not in towers:
    raise CheckpointError(f"encoder_weights={weights!r}: objective {objective!r} checkpoints have "
                          f"{sorted(towers)} (or 'default' = {default!r})")
  return tuple(towers[name])


def adopt_architecture(config) -> dict:
  """Copies the encoder architecture (``ARCH_FIELDS``) of ``config.init_from``'s checkpoint into
  ``config.model`` (fields the eval config has); returns the checkpoint's config. No-op without
  ``init_from``."""
  if not config.get("init_from"):
    return {}
  _, saved = checkpoint_objective(config.init_from)
  for k in ARCH_FIELDS:
    if k in saved.get("model", {}) and k in config.model:
      value = saved["model"][k]
      config.model[k] = tuple(value) if isinstance(value, list) else value
  return saved


def load_encoder(init_from: str, weights: str = "default") -> tuple[Any, dict]:
  """(host numpy encoder params, the checkpoint's config)."""
  objective, saved = checkpoint_objective(init_from)
  path = encoder_path(objective, weights, init_from)
  params = ckpt_lib.restore_subtree(init_from, path)
  logging.info("restored %s image encoder %s from %s", objective, "/".join(path), init_from)
  return params, saved


def _flat(tree) -> dict[str, Any]:
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _is_stacked(flat: dict) -> bool:
  return any("/layers/block/" in "/" + k for k in flat)


def _grid(n: int, path: str) -> tuple[int, int]:
  g = math.isqrt(n)
  if g * g != n:
    raise CheckpointError(f"{path}: {n} position embeddings do not form a square grid")
  return g, g


def fit_encoder(abstract, restored, init_from: str) -> dict[str, np.ndarray]:
  """``{path: array}`` for every leaf of the fresh encoder ``abstract`` (shapes) that comes from
  the checkpoint's encoder ``restored``; leaves not returned keep their fresh init (only new PEFT
  parameters). Raises one CheckpointError line when the two do not fit."""
  want = _flat(abstract)
  if _is_stacked(want) != _is_stacked(_flat(restored)):
    restored = vit.stack_layers(restored) if _is_stacked(want) else vit.unstack_layers(restored)
  have = {k: np.asarray(v) for k, v in _flat(restored).items()
          if k.rsplit("/", 1)[-1] not in PRETRAIN_ONLY}
  is_new = lambda k: any(part in NEW_PEFT_KEYS for part in k.split("/"))
  out = {}
  for k, leaf in want.items():
    if k not in have:
      continue
    x = have[k]
    if k.rsplit("/", 1)[-1] == "pos_embed" and x.shape != tuple(leaf.shape) and x.ndim == 3 \
        and x.shape[-1] == leaf.shape[-1]:
      old, new = _grid(x.shape[1], k), _grid(leaf.shape[1], k)
      x = np.asarray(layers.interpolate_pos_embed(jnp.asarray(x), old, new, num_prefix=0))
      logging.info("interpolated %s from a %dx%d to a %dx%d grid", k, *old, *new)
    out[k] = x
  problems = ckpt_lib.mismatch_report({k: x.shape for k, x in out.items()} |
                                      {k: x.shape for k, x in have.items() if k not in want},
                                      {k: tuple(x.shape) for k, x in want.items() if not is_new(k)})
  if problems:
    raise CheckpointError(f"init_from={init_from!r}: the checkpoint's image encoder does not fit "
                          f"the model (check model.* and data.image_size): {problems}")
  return out


def pretrained_encoder(module, data_cfg, init_from: str, weights: str = "default") -> dict[str, np.ndarray]:
  """The encoder restored from ``init_from`` (:func:`load_encoder`) fitted to ``module``'s params
  at ``data_cfg``'s image (or ``data.volume``) shape (:func:`fit_encoder`): path -> array, for
  ``objectives.base.overwrite_params``. This is the ``encoder_loader`` objectives are built with."""
  volume = vit.volume_size_from_config(data_cfg)   # 3D encoders: the data.volume crop
  spatial = volume or (data_cfg.image_size, data_cfg.image_size)
  images = jax.ShapeDtypeStruct((1, *spatial, data_cfg.channels), jnp.float32)
  abstract = nn.unbox(jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), images)["params"])
  restored, _ = load_encoder(init_from, weights)
  return fit_encoder(abstract, restored, init_from)
