"""Trainable masks and layer-wise learning-rate decay for fine-tuning.

Mask functions take a plain (unboxed) param tree and return a same-structure tree of bools
(True = trainable), e.g. ``make_optimizer(config, trainable=functools.partial(last_n_blocks, n=2))``.
Encoder blocks are recognised by a path component ``layer_{i}``; an ``nn.scan`` stack by a
component ``layers`` whose leaves carry a leading layer axis.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfm_jax.peft.lora import STACK_KEY, path_str

_BLOCK = re.compile(r"^layer_(\d+)$")
EMBED_KEYS = ("patch_embed", "cls_token", "pos_embed", "registers", "mask_token", "prompts")
# Parameter-efficient schemes: the path components whose leaves train (with the head).
PEFT_KEYS = {"lora": ("lora",), "prompt": ("prompts",), "adapter": ("adapter_attn", "adapter_mlp")}
NORM_KEYS = ("norm", "fc_norm")


def _parts(path) -> list[str]:
  return path_str(path).split("/")


def _block_index(parts: list[str]) -> int | None:
  for p in parts:
    m = _BLOCK.match(p)
    if m:
      return int(m.group(1))
  return None


def _map(fn, params):
  return jax.tree_util.tree_map_with_path(lambda path, x: fn(_parts(path), x), params)


def full(params) -> Any:
  """Everything trains."""
  return jax.tree.map(lambda _: True, params)


def linear_probe(params, head_key: str = "head") -> Any:
  """Only leaves under a path component ``head_key`` train."""
  mask = _map(lambda parts, _: head_key in parts, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"linear_probe: no parameter under {head_key!r}; nothing would train")
  return mask


def only_keys(params, keys: tuple[str, ...], head_key: str = "head") -> Any:
  """Leaves with a path component in ``keys`` (LoRA adapters, prompts, adapters) and everything
  under ``head_key`` train; the rest is frozen."""
  mask = _map(lambda parts, _: head_key in parts or any(k in parts for k in keys), params)
  if not any(jax.tree.leaves(_map(lambda parts, _: any(k in parts for k in keys), params))):
    raise ValueError(f"no parameter under {keys}: the model has none of these (e.g. set "
                     "model.num_prompts / model.adapter_dim, or add LoRA adapters)")
  return mask


def last_n_blocks(params, n: int, head_key: str = "head") -> Any:
  """The last ``n`` blocks ``layer_{i}`` (i >= depth - n; depth = 1 + largest i), the final norm
  (``norm``/``fc_norm`` outside the blocks) and everything under ``head_key`` train; patch and
  position embeddings, tokens and earlier blocks are frozen.

  A scanned stack (``layers`` leaves with a leading layer axis) trains as a whole or not at all;
  ``0 < n < depth`` would need a per-layer mask inside one leaf, which a bool mask cannot express,
  so that raises ValueError (unstack with ``vit.unstack_layers`` first).
  """
  if n < 0:
    raise ValueError(f"last_n_blocks: n must be >= 0, got {n}")
  leaves = jax.tree_util.tree_leaves_with_path(params)
  idx = [_block_index(_parts(p)) for p, _ in leaves]
  depth = 1 + max((i for i in idx if i is not None), default=-1)
  for p, x in leaves:
    parts = _parts(p)
    if STACK_KEY in parts[:-1] and head_key not in parts:
      stacked = int(x.shape[0])
      if 0 < n < stacked:
        raise ValueError(f"last_n_blocks: {path_str(p)!r} is a scanned stack of {stacked} layers; "
                         f"training only the last {n} is not expressible by a bool mask. "
                         "Build the model with scan=False (vit.unstack_layers) instead.")

  def rule(parts: list[str], x) -> bool:
    if head_key in parts:
      return True
    i = _block_index(parts)
    if i is not None:
      return i >= depth - n
    if STACK_KEY in parts[:-1]:
      return n >= int(x.shape[0])
    return any(k in parts for k in NORM_KEYS)

  return _map(rule, params)


def layer_id(parts: list[str], num_layers: int) -> int:
  """MAE/BEiT layer id: 0 for embeddings/tokens, ``i + 1`` for ``layer_i``, ``num_layers + 1``
  for everything after the blocks (final norm, head)."""
  i = _block_index(parts)
  if i is not None:
    if i >= num_layers:
      raise ValueError(f"layer id: block layer_{i} but num_layers={num_layers}")
    return i + 1
  if any(k in parts for k in EMBED_KEYS):
    return 0
  return num_layers + 1


def layerwise_lr_decay(params, decay: float, num_layers: int) -> Any:
  """Tree of lr multipliers ``decay ** (num_layers + 1 - layer_id)`` (see :func:`layer_id`).

  Leaves are Python floats; a scanned-stack leaf ``[L, ...]`` gets a float32 array of shape
  ``[L, 1, ...]`` (per-layer multipliers that broadcast against the update).
  """
  def rule(parts: list[str], x):
    if STACK_KEY in parts[:-1] and _block_index(parts) is None:
      stacked = int(x.shape[0])
      if stacked != num_layers:
        raise ValueError(f"layerwise_lr_decay: {'/'.join(parts)!r} stacks {stacked} layers, "
                         f"num_layers={num_layers}")
      m = decay ** (num_layers - np.arange(stacked, dtype=np.float64))
      return np.asarray(m, np.float32).reshape((stacked,) + (1,) * (len(x.shape) - 1))
    return float(decay ** (num_layers + 1 - layer_id(parts, num_layers)))

  return _map(rule, params)


def scale_by_tree(multipliers: Any | Callable[[Any], Any]) -> optax.GradientTransformation:
  """Stateless: multiplies each update leaf by its multiplier (a float or a broadcastable array).

  ``multipliers`` is a tree, or a function ``params -> tree`` evaluated at trace time (then
  ``update`` needs ``params``; e.g. ``lambda p: layerwise_lr_decay(p, 0.65, 12)``), for use where
  the optimizer is built before the params exist. Put it after ``optax.adamw`` so it scales the
  lr of the Adam step and of the decoupled weight decay together (BEiT/MAE param-group
  ``lr_scale``). Works inside ``optax.multi_transform`` (masked-out leaves pass through).
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    mults = multipliers
    if callable(multipliers):
      if params is None:
        raise ValueError("scale_by_tree with a multiplier function needs params in update()")
      mults = multipliers(params)

    def one(m, u):
      if u is None or isinstance(u, optax.MaskedNode):
        return u
      return u * jnp.asarray(m, u.dtype)

    return jax.tree.map(one, mults, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
