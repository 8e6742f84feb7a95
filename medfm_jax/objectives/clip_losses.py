"""CLIP (softmax InfoNCE) and SigLIP (sigmoid) losses over the GLOBAL batch, blockwise per device.

Under a mesh whose batch axes (``data``, ``fsdp``) are split, the loss runs in ``jax.shard_map``:
each device all-gathers the other tower's embeddings and builds only its own block of logits,
``[local batch, global batch]``; the global ``[B, B]`` matrix never exists on any device. Every
device's rows see every device's negatives, so the result equals the single-device loss (tested on
1 vs 8 fake devices). Without a mesh (or with unsplit batch axes) the same code runs with one block.

CLIP: ``logits = exp(s) * I Tᵀ`` with ``s`` clamped to ``[0, ln 100]`` on every forward;
``loss = ½ (CE(logits, diag) + CE(logitsᵀ, diag))`` averaged over the global batch.
SigLIP: ``logits = exp(t) * I Tᵀ + b``; labels +1 on the diagonal, -1 elsewhere;
``loss = -Σ_ij log σ(label_ij · logit_ij) / B`` (sum over all B² pairs, as in the SigLIP paper).

An optional ``valid [B]`` row mask (FLAVA's mixed batches: only paired rows) drops the other rows
as anchors AND as negatives: the loss is the one of the valid rows alone (``B`` -> their count;
0 with zero gradients when there is none).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.parallel.mesh import BATCH_AXES

LOSSES = ("clip", "siglip")
MAX_LOGIT_SCALE = math.log(100.0)
_MASKED_LOGIT = -1e9    # finite: a row whose columns are all masked stays NaN-free (and is dropped)


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clamp_logit_scale(s, max_value: float = MAX_LOGIT_SCALE):
  """``exp(clip(s, 0, max_value))``: the CLIP temperature, clamped on every forward."""
  return jnp.exp(jnp.clip(s, 0.0, max_value))


def _block_sums(img, txt, scale, bias, kind: str, axes: tuple[str, ...], valid=None):
  """Sum of this device's per-row losses; ``img``/``txt`` are its rows ``[b, e]`` (normalised);
  ``valid`` (None or bool ``[b]``) masks rows out as anchors and as other rows' negatives."""
  b = img.shape[0]
  if axes:
    img_all = jax.lax.all_gather(img, axes, tiled=True)            # [B, e]
    txt_all = jax.lax.all_gather(txt, axes, tiled=True)
    offset = jax.lax.axis_index(axes) * b
  else:
    img_all, txt_all, offset = img, txt, 0
  cols = None if valid is None else (jax.lax.all_gather(valid, axes, tiled=True) if axes else valid)
  hi = jax.lax.Precision.HIGHEST
  labels = offset + jnp.arange(b)                                     # global column of each row
  logits_i = scale * jnp.matmul(img, txt_all.T, precision=hi)         # [b, B]: my images vs all texts
  if kind == "clip":
    logits_t = scale * jnp.matmul(txt, img_all.T, precision=hi)       # [b, B]: my texts vs all images
    def ce(logits):
      if cols is not None:
        logits = jnp.where(cols[None, :], logits, _MASKED_LOGIT)
      per_row = (jax.nn.logsumexp(logits, axis=-1)
                 - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0])
      return per_row if valid is None else jnp.where(valid, per_row, 0.0)
    return 0.5 * (ce(logits_i).sum() + ce(logits_t).sum())
  if kind == "siglip":
    logits = logits_i + bias
    sign = jnp.where(labels[:, None] == jnp.arange(logits.shape[1])[None, :], 1.0, -1.0)
    pair_losses = -jax.nn.log_sigmoid(sign * logits)
    if valid is not None:
      pair_losses = jnp.where(valid[:, None] & cols[None, :], pair_losses, 0.0)
    return pair_losses.sum()
  raise ValueError(f"objective.loss={kind!r}: allowed {LOSSES}")


def _split_batch_axes() -> tuple[str, ...]:
  """Batch mesh axes of the current (abstract) mesh; () when there is no mesh to split over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes if any(mesh.shape[a] > 1 for a in axes) else ()


def contrastive_loss(img_emb, txt_emb, logit_scale, logit_bias=None, kind: str = "clip",
                     max_logit_scale: float = MAX_LOGIT_SCALE, valid=None):
  """Global-batch CLIP / SigLIP loss of unnormalised embeddings ``[B, e]`` (rows are pairs).

  ``logit_scale`` is the raw learnable log-temperature (clamped here to ``[0, max_logit_scale]``);
  ``logit_bias`` is SigLIP's bias (ignored by CLIP). ``valid`` (bool ``[B]``, optional): only
  these rows are pairs; the loss is averaged over them. Returns a float32 scalar.
  """
  if kind not in LOSSES:
    raise ValueError(f"objective.loss={kind!r}: allowed {LOSSES}")
  img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
  scale = clamp_logit_scale(jnp.asarray(logit_scale, jnp.float32), max_logit_scale)
  bias = jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
  global_batch = img.shape[0]
  axes = _split_batch_axes()
  args, specs = (img, txt, scale, bias), (P(axes), P(axes), P(), P())
  if valid is not None:
    args, specs = args + (jnp.asarray(valid, bool),), specs + (P(axes),)
  if not axes:
    total = _block_sums(*args[:4], kind, (), *args[4:])
  else:
    @functools.partial(jax.shard_map, in_specs=specs, out_specs=P())
    def blockwise(i, t, s, c, *v):
      return jax.lax.psum(_block_sums(i, t, s, c, kind, axes, *v), axes)
    total = blockwise(*args)
  if valid is None:
    return total / global_batch
  count = jnp.sum(args[4], dtype=jnp.float32)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def memory_analysis(kind: str, global_batch: int, embed_dim: int, mesh) -> dict[str, int]:
  """Per-device bytes (XLA ``compiled.memory_analysis()``) of the loss and its gradient with
  respect to both embeddings, for float32 ``[global_batch, embed_dim]`` inputs split over the
  mesh's batch axes. Nothing is allocated (abstract inputs)."""
  emb = jax.ShapeDtypeStruct((global_batch, embed_dim), jnp.float32,
                             sharding=mesh_lib.batch_sharding(mesh, 2))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  fn = jax.value_and_grad(lambda i, t, s, b: contrastive_loss(i, t, s, b, kind), argnums=(0, 1, 2, 3))
  with mesh_lib.use_mesh(mesh):
    stats = jax.jit(fn).lower(emb, emb, scalar, scalar).compile().memory_analysis()
  return {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp")}
