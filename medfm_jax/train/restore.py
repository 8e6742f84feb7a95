"""Restore the image encoder of any pretraining checkpoint into a classifier or feature extractor.

The objective that wrote the checkpoint (``objective.name`` in its saved config: a built-in short
name or an import path) declares where the image encoder lives in the saved train state
(``Objective.image_encoders``): MAE ``params/encoder``; DINO ``extra/teacher/backbone`` (default) or
``params/backbone`` (student); a fine-tuned classifier ``params/backbone``; the CLIP/SigLIP image
tower and the FLAVA image encoder ``params/image``.

This lives in the train layer (it reads checkpoints); objectives get :func:`pretrained_encoder`
handed in as their ``encoder_loader`` (``train.assemble.build_objective``) for ``init_from`` and LiT.

``init_from`` (and LiT's tower) may also be a local public model (HF ``config.json`` with a supported
``model_type``, open_clip, timm; ``interop.hf_family``): :func:`adopt_architecture` takes its model
fields, :func:`pretrained_encoder` its image encoder, and for pretraining runs
:func:`init_from_values` gives ``state.named_init`` the whole initial model (the objective's own
family) or the image encoder for every ``image_encoders`` path (DINO: student and teacher).

Only that subtree is read. :func:`fit_encoder` matches it to a freshly initialised encoder: learned
position embeddings are resized bicubically (volumes: tricubically, between the 3-D grids of the
checkpoint's and the model's configs) to the new grid (fixed sin-cos ones are recomputed by
the model), scanned/unrolled block stacks are converted, new parameter-efficient parameters
(prompts, adapters) keep their fresh init; anything else that does not fit raises one
:class:`CheckpointError` line listing missing/unexpected keys and shape mismatches.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medfm_jax import interop, objectives
from medfm_jax.errors import ConfigError
from medfm_jax.models import layers, vit
from medfm_jax.peft.lora import path_str
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train.checkpoint import CheckpointError

# Encoder architecture fields copied from the checkpoint's config (model.*) into the eval config.
ARCH_FIELDS = ("variant", "width", "depth", "num_heads", "mlp_dim", "pos_embed", "layer_norm_eps",
               "layer_scale_init", "num_registers", "activation", "swiglu", "ln_pre", "patch_embed",
               "cls_pool", "patch_3d")
# Image geometry the encoder was trained at (data.*): the closing table always evaluates at the
# run's; the eval CLIs adopt it unless set on the command line (:func:`adopt_data`).
DATA_FIELDS = ("image_size", "channels", "mean", "std")
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


def hf_family(init_from: str) -> str | None:
  """The ``interop`` family of an HF model directory / weights file; None for our checkpoints."""
  try:
    return interop.hf_family(init_from)
  except ValueError as e:
    raise CheckpointError(f"init_from={init_from!r}: {e}") from None


def _takes_whole_model(objective_name: str, family: str) -> bool:
  """True when an HF model of ``family`` is the whole model of the objective (MAE from
  ViTMAEForPreTraining, CLIP from CLIPModel, ...); else only its image encoder is used."""
  export = objectives.resolve(objective_name).hf_export
  same = interop.SAME_MODEL.get(family, family)
  return bool(export) and export[0] == same and interop.IMAGE_ENCODERS[family] != ()


def _set_field(config, key: str, value) -> None:
  node, *parents = config, *key.split(".")[:-1]
  for p in parents:
    if p not in node:
      return
    node = node[p]
  leaf = key.rsplit(".", 1)[-1]
  if leaf in node:
    node[leaf] = tuple(value) if isinstance(value, list) else value


def _adopt_hf(config, source: str, family: str, encoder_only: bool = False) -> None:
  """The HF model's fields (its family's ``config_overrides``) into ``config``: all ``model.*``
  (and the objective's loss) when it is the run's whole model, else the encoder's ``ARCH_FIELDS``;
  ``data.channels`` always. ``data.image_size`` stays the run's (positions are resampled)."""
  try:
    fields = interop.FAMILIES[family].config_overrides(source)
  except ValueError as e:
    raise CheckpointError(f"init_from={source!r}: {e}") from None
  whole = not encoder_only and _takes_whole_model(config.objective.name, family)
  for key, value in fields.items():
    encoder_field = key.startswith("model.") and key[len("model."):] in ARCH_FIELDS
    if key == "data.channels" or encoder_field or (whole and key.startswith(("model.", "objective."))):
      _set_field(config, key, value)


def adopt_architecture(config) -> dict:
  """Copies the encoder architecture (``ARCH_FIELDS``) of ``config.init_from``'s checkpoint into
  ``config.model`` (fields the config has); returns the checkpoint's config. An HF model directory
  or file (also as ``objective.lit_init_from``) gives its fields instead (:func:`_adopt_hf`) and
  returns {}. No-op without either."""
  lit = (config.get("objective") or {}).get("lit_init_from")
  if lit and (lit_family := hf_family(lit)) is not None:    # LiT tower from an HF model
    _adopt_hf(config, lit, lit_family, encoder_only=True)
  if not config.get("init_from"):
    return {}
  family = hf_family(config.init_from)
  if family is not None:
    _adopt_hf(config, config.init_from, family)
    return {}
  _, saved = checkpoint_objective(config.init_from)
  for k in ARCH_FIELDS:
    if k in saved.get("model", {}) and k in config.model:
      value = saved["model"][k]
      config.model[k] = tuple(value) if isinstance(value, list) else value
  return saved


def adopt_data(config, saved: dict, explicit=()) -> dict:
  """Copies the checkpoint's image geometry (``DATA_FIELDS`` of the saved config ``saved``'s
  ``data``) into ``config.data``, except the dotted keys in ``explicit`` (``"data.image_size"``:
  set by the user); returns {field: (old, new)} of the fields that changed (logged)."""
  changed = {}
  for k in DATA_FIELDS:
    if f"data.{k}" in explicit or k not in saved.get("data", {}) or k not in config.data:
      continue
    value = saved["data"][k]
    value = tuple(value) if isinstance(value, list) else value
    if value != config.data[k]:
      changed[k] = (config.data[k], value)
      config.data[k] = value
  for k, (old, new) in changed.items():
    logging.info("init_from: data.%s %s -> %s (the checkpoint's; set it explicitly to override)",
                 k, old, new)
  return changed


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


# One compiled program per grid pair (op by op, a tricubic resize compiles ~70 small programs).
_resample_pos_embed = jax.jit(layers.interpolate_pos_embed, static_argnums=(1, 2, 3))


def _fmt(grid) -> str:
  return "x".join(map(str, grid))


def fit_encoder(abstract, restored, init_from: str, fresh: tuple[str, ...] = (),
                grids: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
  """``{path: array}`` for every leaf of the fresh encoder ``abstract`` (shapes) that comes from
  the checkpoint's encoder ``restored``; leaves not returned keep their fresh init (only new PEFT
  parameters, and the top-level subtrees ``fresh``). Raises one CheckpointError line when the two
  do not fit.

  Learned position embeddings are resampled from the checkpoint's grid to the model's:
  ``grids`` (checkpoint grid, model grid) when known (volumes: the same token count may be another
  3-D grid), else square 2-D grids inferred from the token counts when those differ."""
  want = _flat(abstract)
  if _is_stacked(want) != _is_stacked(_flat(restored)):
    restored = vit.stack_layers(restored) if _is_stacked(want) else vit.unstack_layers(restored)
  have = {k: np.asarray(v) for k, v in _flat(restored).items()
          if k in want or k.rsplit("/", 1)[-1] not in PRETRAIN_ONLY}
  is_new = lambda k: any(part in NEW_PEFT_KEYS for part in k.split("/")) or k.split("/")[0] in fresh
  out = {}
  for k, leaf in want.items():
    if k not in have:
      continue
    x = have[k]
    old = new = None
    if k.rsplit("/", 1)[-1] == "pos_embed" and x.ndim == 3 and x.shape[-1] == leaf.shape[-1]:
      if grids is not None:
        old, new = grids
        fits = math.prod(old) == x.shape[1] and math.prod(new) == leaf.shape[1]
        if len(old) != len(new) or (not fits and x.shape != tuple(leaf.shape)):
          raise CheckpointError(
              f"init_from={init_from!r}: {k}: the checkpoint's {x.shape[1]} learned position "
              f"embeddings on a {_fmt(old)} grid cannot be resampled to the model's {_fmt(new)} grid")
        if not fits or old == new:
          old = new = None
      elif x.shape != tuple(leaf.shape):
        old, new = _grid(x.shape[1], k), _grid(leaf.shape[1], k)
    if old is not None:
      x = np.asarray(_resample_pos_embed(jnp.asarray(x), tuple(old), tuple(new), 0))
      logging.info("resampled %s from a %s to a %s grid", k, _fmt(old), _fmt(new))
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
  family = hf_family(init_from)
  grids = None
  if family is not None:
    restored = _subtree(_load_hf(init_from, family, data_cfg.image_size), interop.IMAGE_ENCODERS[family])
  else:
    restored, saved = load_encoder(init_from, weights)
    if volume is not None and isinstance(module, vit.VisionTransformer):
      grids = _volume_grids(saved, module.learned_grid(3))
  return fit_encoder(abstract, restored, init_from, grids=grids)


def _volume_grids(saved: dict, new: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """(the checkpoint's learned position-embedding grid from its saved config, ``new``); None when
  its config lacks the fields (then the grids are inferred from the token counts)."""
  try:
    return vit.learned_grid_from_config(saved["model"], saved["data"]), new
  except (KeyError, TypeError, ValueError):
    return None


def _subtree(tree, keys: tuple[str, ...]):
  for k in keys:
    tree = tree[k]
  return tree


def _load_hf(source: str, family: str, image_size: int) -> dict:
  """The params of an HF model (unrolled, numpy); DINOv2's positions resampled to ``image_size``
  with HF's own rule (other families' by :func:`fit_encoder`)."""
  kwargs = {"image_size": image_size} if family == "dinov2" else {}
  try:
    _, params, _ = interop.FAMILIES[family].load(source, **kwargs)
  except ValueError as e:
    raise CheckpointError(f"init_from={source!r}: {e}") from None
  logging.info("loaded the HF %s model %s", family, source)
  return params


def _init_sources(objective, init_from: str) -> dict[tuple[str, ...], Any]:
  """Train-state path -> the restored subtree that initialises it, for a pretraining run's
  ``init_from``: the whole model when the source is the run's own kind (an HF model of the
  objective's ``hf_export`` family, or our checkpoint of the same objective: its ``params`` and the
  image encoders kept in ``extra``, e.g. the DINO teacher), else the source's image encoder into
  every image encoder of the run (DINO: student and teacher; heads keep their fresh init)."""
  name, data = objective.config.objective.name, objective.config.data
  cls = objectives.resolve(name)
  family = hf_family(init_from)
  if family is not None:
    tree = _load_hf(init_from, family, data.image_size)
    if _takes_whole_model(name, family):
      return {cls.hf_export[1]: tree}
    encoder = _subtree(tree, interop.IMAGE_ENCODERS[family])
  elif objective_class(checkpoint_objective(init_from)[0], init_from) is cls:
    extra = {p: ckpt_lib.restore_subtree(init_from, p) for p in cls.image_encoders.values() if p[0] == "extra"}
    return {("params",): ckpt_lib.restore_subtree(init_from, ("params",))} | extra
  else:
    encoder, _ = load_encoder(init_from)
  if not cls.image_encoders:
    raise CheckpointError(f"init_from={init_from!r}: objective {cls.__name__} declares no image encoder to initialise")
  return {path: encoder for path in cls.image_encoders.values()}


def _drop_unfit_heads(heads: tuple[str, ...], target, restored, init_from: str) -> tuple[dict, tuple[str, ...]]:
  """(``restored`` without the ``heads`` that it lacks or holds in another shape than ``target``,
  those heads): they keep their fresh init, said in one log line."""
  shapes = lambda tree: {k: tuple(np.shape(x)) for k, x in _flat(tree).items()}
  absent = [h for h in heads if h in target and h not in restored]
  reshaped = [h for h in heads if h in target and h in restored and shapes(target[h]) != shapes(restored[h])]
  if absent or reshaped:
    logging.warning("init_from=%s: fresh init for the heads %s", init_from, "; ".join(
        ([f"{', '.join(absent)} (not in the source)"] if absent else [])
        + ([f"{', '.join(reshaped)} (other shapes in the source: e.g. another MIM target)"] if reshaped else [])))
  return {k: v for k, v in restored.items() if k not in reshaped}, (*absent, *reshaped)


_INIT_VALUES = weakref.WeakKeyDictionary()   # objective -> {state path: array} (read once per run)


def init_from_values(objective, params, extra) -> dict[str, np.ndarray]:
  """``{'params/...' or 'extra/...': array}`` from ``config.init_from`` fitted to the fresh state
  (shapes of ``params`` / ``extra``, possibly abstract); {} without ``init_from`` or for
  objectives that read it themselves (``Objective.trainer_init_from`` False)."""
  init_from = objective.config.get("init_from")
  if not init_from or not objective.trainer_init_from:
    return {}
  if objective not in _INIT_VALUES:
    state = nn.unbox({"params": params, "extra": extra})
    config, grids = objective.config, None
    if vit.volume_size_from_config(config.data) is not None and hf_family(init_from) is None:
      grids = _volume_grids(checkpoint_objective(init_from)[1],
                            vit.learned_grid_from_config(config.model, config.data))
    values = {}
    for path, restored in _init_sources(objective, init_from).items():
      target, fresh = _subtree(state, path), ()
      if hf_family(init_from) is not None and path == (objective.hf_export or (None, None))[1]:
        restored, fresh = _drop_unfit_heads(objective.hf_optional_heads, target, restored, init_from)
      with jax.ensure_compile_time_eval():   # called while init is traced: resample eagerly
        fitted = fit_encoder(target, restored, init_from, fresh, grids)
      values |= {"/".join((*path, k)): v for k, v in fitted.items()}
    _INIT_VALUES[objective] = values
  return _INIT_VALUES[objective]
