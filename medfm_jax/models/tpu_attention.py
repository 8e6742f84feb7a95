"""Fused attention on TPU: JAX's Pallas flash-attention kernel for ``[batch, seq, heads, kv]``
activations, any sequence length, key-padding masks and the device mesh.

The kernel (``jax.experimental.pallas.ops.tpu.flash_attention``) keeps O(seq · kv) memory per head
instead of XLA's ``[batch, heads, seq, seq]`` logits, forward and backward. It needs sequence
blocks of a multiple of 128 tokens (the TPU lane width), so queries and keys are padded to a
multiple of their block and the padded keys are hidden with segment ids: real queries and kept keys are
segment 1, masked keys and padding segment 0 (padded queries then see only padding and are
dropped). A Pallas call is opaque to XLA's SPMD partitioner, so under a mesh it runs in
``jax.shard_map`` over the mesh axes that shard the batch and the heads (the logical rules of
``parallel.mesh``).

On CPU the kernel runs in Pallas' TPU interpret mode (``pltpu.force_tpu_interpret_mode()``), which
is how the tests compare it with XLA's attention; ``python -m medfm_jax.plan --topology=v5p-128``
compiles it for a TPU slice without the hardware.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as fa
from jax.sharding import PartitionSpec as P

from medfm_jax.parallel import mesh as mesh_lib

LANE = 128                 # TPU lane width: the smallest sequence block
LONG_BLOCK = 512           # block for sequences of at least LONG_SEQ tokens (fewer grid steps)
LONG_SEQ = 2048

_TARGET = contextvars.ContextVar("medfm_jax_attention_target", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
  """Programs traced inside compile for ``platform`` ('tpu', 'gpu', 'cpu'), whatever the default
  backend is: ``model.attention_impl='auto'`` resolves for it and 'pallas' is allowed on 'tpu'
  (the planner compiling for a TPU slice from a CPU host, the tests in interpret mode)."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def target() -> str:
  """The platform programs are traced for: :func:`target_platform`'s, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


def block_size(seq: int) -> int:
  """Query/key block of the kernel for a sequence of ``seq`` tokens."""
  return LONG_BLOCK if seq >= LONG_SEQ else LANE


def _segment_ids(b: int, t: int, t_pad: int, s: int, s_pad: int, key_mask):
  """(query, key) segment ids ``[b, t_pad]``, ``[b, s_pad]``: 1 = a real query / a kept key,
  0 = padding or a masked key."""
  q_seg = jnp.broadcast_to((jnp.arange(t_pad) < t).astype(jnp.int32), (b, t_pad))
  keep = jnp.ones((b, s), bool) if key_mask is None else key_mask
  kv_seg = jnp.pad(keep.astype(jnp.int32), ((0, 0), (0, s_pad - s)))
  return fa.SegmentIds(q=q_seg, kv=kv_seg)


def _flash(q, k, v, q_seg, kv_seg, is_causal: bool, bq: int, bk: int):
  """The kernel on padded ``[b, h, n, d]`` inputs (one device's shard), query / key blocks
  ``bq`` / ``bk``."""
  sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                        block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  return fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(q_seg, kv_seg), causal=is_causal,
                            sm_scale=q.shape[-1] ** -0.5, block_sizes=sizes)


def key_padding_mask(mask, b: int, s: int):
  """``mask`` broadcastable to ``[b, heads, q, k]`` as a ``[b, s]`` key mask; masks that vary
  over heads or queries are refused (the kernel hides keys by segment, per example)."""
  if mask is None:
    return None
  if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError(f"model.attention_impl='pallas' takes key-padding masks [b, 1, 1, keys], got a "
                     f"mask of shape {tuple(mask.shape)}; use 'xla'")
  return jnp.broadcast_to(mask[:, 0, 0, :], (b, s)).astype(bool)


def flash_attention(q, k, v, mask=None, is_causal: bool = False):
  """Softmax attention of ``[batch, seq, heads, kv]`` q/k/v with an optional key-padding ``mask``
  (True = attend): the contract of ``jax.nn.dot_product_attention``."""
  b, t = q.shape[:2]
  s = k.shape[1]
  if is_causal and s != t:
    raise ValueError(f"model.attention_impl='pallas': causal attention needs as many keys as "
                     f"queries, got {t} queries and {s} keys")
  bq, bk = block_size(t), block_size(s)
  t_pad, s_pad = -(-t // bq) * bq, -(-s // bk) * bk
  seg = _segment_ids(b, t, t_pad, s, s_pad, key_padding_mask(mask, b, s))
  to_kernel = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  args = (to_kernel(q, t_pad), to_kernel(k, s_pad), to_kernel(v, s_pad), seg.q, seg.kv)
  local = lambda q, k, v, qs, ks: _flash(q, k, v, qs, ks, is_causal, bq, bk)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    spec = mesh_lib.logical_to_spec(("batch", "act_heads", None, None), args[0].shape, mesh)
    seg_spec = P(spec[0], None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                          out_specs=spec, check_vma=False)
  out = local(*args)
  return out.transpose(0, 2, 1, 3)[:, :t]
