"""SAM image encoders: the ViTDet-style ViT of Segment Anything, and a neck over our own ViTs.

:class:`SamImageEncoder` is SAM's encoder (Kirillov et al., 2023): patch embedding, a learned
absolute position grid, pre-LN blocks whose attention is windowed (non-overlapping
``window_size`` windows, zero padding to a multiple) except at ``global_attn_indexes``, each with a
decomposed relative position bias (MViTv2), then :class:`ConvNeck` (1x1 conv, LayerNorm, 3x3 conv,
LayerNorm, no biases) down to ``out_chans`` (256). Attention keeps per-head 3-D q/k/v kernels
``[embed, heads, kv]`` and calls ``jax.nn.dot_product_attention`` with the position bias as
``bias``. :class:`ViTNeckEncoder` puts the same neck on any :class:`VisionTransformer`, so MAE,
DINO or CLIP encoders pretrained here can encode images for the mask decoder.

Images are NHWC; outputs are ``[b, H/p, W/p, out_chans]`` (channels last, unlike PyTorch).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import layers, vit
from medfm_jax.models.layers import constrain


def resize_linear_1d(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """``x [L, c]`` -> ``[size, c]`` by linear interpolation with half-pixel centres, no antialiasing
  (PyTorch ``F.interpolate(mode='linear', align_corners=False)``)."""
  length = x.shape[0]
  if length == size:
    return x
  src = np.maximum((np.arange(size) + 0.5) * (length / size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), length - 1)
  hi = np.minimum(lo + 1, length - 1)
  frac = jnp.asarray((src - lo)[:, None], x.dtype)
  return x[lo] * (1 - frac) + x[hi] * frac


def relative_positions(q_size: int, k_size: int, rel_pos: jnp.ndarray) -> jnp.ndarray:
  """Relative position embeddings ``[q_size, k_size, c]`` gathered from ``rel_pos [L, c]``
  (resized to ``2 max(q, k) - 1`` entries when it has another length)."""
  rel_pos = resize_linear_1d(rel_pos, 2 * max(q_size, k_size) - 1)
  q = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  return rel_pos[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).astype(np.int64)]


def window_partition(x: jnp.ndarray, window: int) -> tuple[jnp.ndarray, tuple[int, int]]:
  """``[b, h, w, c]`` -> ``([b * nh * nw, window, window, c], (padded h, padded w))``; zero padding
  at the bottom / right up to a multiple of ``window``."""
  b, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jnp.ndarray, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jnp.ndarray:
  """Inverse of :func:`window_partition` (drops the padding)."""
  hp, wp = padded_hw
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, -1)[:, :hw[0], :hw[1]]


class RelPosAttention(nn.Module):
  """Self-attention over a 2-D token grid ``[b, h, w, d]`` with a decomposed relative position bias.

  ``rel_pos_h / rel_pos_w [2 s - 1, head_dim]`` are created for the grid ``rel_pos_size`` (the
  window, or the whole pretraining grid for global blocks) and linearly resized for other grids.
  ``query_chunk > 0`` computes the attention of at most that many queries at a time (a rematerialised
  loop), so the ``[b, heads, queries, keys]`` bias, logits and probabilities never exist whole: a
  global block at 1024 px holds ``12 x 4096 x 4096`` of each in float32 otherwise (805 MB apiece).
  """
  num_heads: int
  rel_pos_size: tuple[int, int]
  use_rel_pos: bool = True
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  implementation: str | None = None
  query_chunk: int = 0

  @nn.compact
  def __call__(self, x):
    b, h, w, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    head_dim = d // self.num_heads
    tokens = constrain(x.reshape(b, h * w, d), ("batch", "seq", "act_embed"))
    proj = lambda name: layers.DenseGeneral((self.num_heads, head_dim), ("embed", "heads", "kv"),
                                            use_bias=self.qkv_bias, dtype=self.dtype, name=name)(tokens)
    q, k, v = (constrain(proj(n), ("batch", "seq", "act_heads", "act_kv")) for n in ("query", "key", "value"))
    table_h = table_w = None
    if self.use_rel_pos:
      sh, sw = self.rel_pos_size
      rel_h = layers.param_with_axes(self, "rel_pos_h", nn.initializers.zeros, (2 * sh - 1, head_dim), (None, "kv"))
      rel_w = layers.param_with_axes(self, "rel_pos_w", nn.initializers.zeros, (2 * sw - 1, head_dim), (None, "kv"))
      table_h = relative_positions(h, h, rel_h).astype(self.dtype)     # [query row, key row, c]
      table_w = relative_positions(w, w, rel_w).astype(self.dtype)     # [query col, key col, c]
    if 0 < self.query_chunk < h * w:
      out = _chunked_rel_pos_attention(q, k, v, table_h, table_w, (h, w), self.query_chunk, self.implementation)
    else:
      rows, cols = np.divmod(np.arange(h * w), w)
      out = _rel_pos_attention(q, k, v, table_h, table_w, rows, cols, self.implementation)
    out = constrain(out, ("batch", "seq", "act_heads", "act_kv"))
    y = layers.DenseGeneral((d,), ("heads", "kv", "embed"), contract_dims=2, dtype=self.dtype, name="out")(out)
    return y.reshape(b, h, w, d)


def _rel_pos_attention(q, k, v, table_h, table_w, rows, cols, implementation):
  """Attention of queries ``q [b, n, heads, c]`` at grid rows / cols ``[n]`` over all keys
  ``k, v [b, h * w, heads, c]``, with the decomposed bias ``q . table_h[row, key row] +
  q . table_w[col, key col]`` (none when the tables are None)."""
  bias = None
  if table_h is not None:
    b, n, heads, _ = q.shape
    bias_h = jnp.einsum("bqnc,qkc->bnqk", q, table_h[rows])
    bias_w = jnp.einsum("bqnc,qkc->bnqk", q, table_w[cols])
    bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, heads, n, -1)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


def _chunked_rel_pos_attention(q, k, v, table_h, table_w, grid, chunk, implementation):
  """:func:`_rel_pos_attention` over ``chunk`` queries at a time (the last chunk zero-padded), each
  chunk rematerialised in the backward pass, so only one chunk's ``[b, heads, chunk, h * w]``
  intermediates are alive at once."""
  b, n, heads, c = q.shape
  num = -(-n // chunk)
  pad = num * chunk - n
  positions = np.pad(np.arange(n), (0, pad)).reshape(num, chunk)
  rows, cols = np.divmod(positions, grid[1])
  q_chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, num, chunk, heads, c).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    q_chunk, r, cl = args
    return _rel_pos_attention(q_chunk, k, v, table_h, table_w, r, cl, implementation)

  out = jax.lax.map(one, (q_chunks, jnp.asarray(rows), jnp.asarray(cols)))
  return out.swapaxes(0, 1).reshape(b, num * chunk, heads, c)[:, :n]


class ViTDetBlock(nn.Module):
  """Pre-LN block on ``[b, h, w, d]``: windowed (``window_size > 0``) or global attention, then MLP."""
  num_heads: int
  mlp_dim: int
  window_size: int
  grid_size: tuple[int, int]            # pretraining grid (rel-pos size of global blocks)
  use_rel_pos: bool = True
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  query_chunk: int = 0                  # > 0: attention over at most this many queries at a time

  @nn.compact
  def __call__(self, x):
    b, h, w, d = x.shape
    ws = self.window_size
    y = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm1")(x)
    if ws > 0:
      y, padded = window_partition(y, ws)
    y = RelPosAttention(self.num_heads, (ws, ws) if ws > 0 else tuple(self.grid_size), self.use_rel_pos,
                        self.qkv_bias, self.dtype, None if self.use_rel_pos else self.attention_impl,
                        self.query_chunk, name="attn")(y)
    if ws > 0:
      y = window_unpartition(y, ws, padded, (h, w))
    t = (x + y).reshape(b, h * w, d)
    t = t + layers.Mlp(self.mlp_dim, "gelu", dtype=self.dtype, name="mlp")(
        layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm2")(t))
    return t.reshape(b, h, w, d)


class ConvNeck(nn.Module):
  """``[b, h, w, d]`` -> ``[b, h, w, out_chans]``: 1x1 conv, LayerNorm, 3x3 conv, LayerNorm (no conv biases)."""
  out_chans: int = 256
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Conv(self.out_chans, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="ln1")(x)
    x = layers.Conv(self.out_chans, 3, padding=1, use_bias=False, dtype=self.dtype, name="conv2")(x)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="ln2")(x)
    return constrain(x, ("batch", None, None, "act_embed"))


class SamImageEncoder(nn.Module):
  """SAM's ViT image encoder: ``images [b, H, W, c]`` -> ``[b, H/p, W/p, out_chans]``.

  The learned absolute position grid is created for ``image_size`` and bicubically resized for
  other input sizes (SAM itself only runs at ``image_size``). ``attention_chunk > 0`` bounds the
  attention memory of the blocks with more tokens than that (the global ones; see
  :class:`RelPosAttention`); the outputs are the same.
  """
  image_size: int = 1024
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None
  attention_chunk: int = 0

  @nn.compact
  def __call__(self, images, deterministic: bool = True):  # pylint: disable=unused-argument
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    grid, g0 = (h // p, w // p), self.image_size // p
    x = vit.PatchEmbed(p, self.width, self.dtype, name="patch_embed")(images.astype(self.dtype))
    x = x.reshape(b, *grid, self.width)
    if self.use_abs_pos:
      pos = layers.param_with_axes(self, "pos_embed", nn.initializers.zeros, (1, g0, g0, self.width),
                                   (None, None, None, "embed"))
      if grid != (g0, g0):
        pos = jax.image.resize(pos, (1, *grid, self.width), method="bicubic")
      x = x + pos.astype(self.dtype)
    block_cls = nn.remat(ViTDetBlock) if self.remat else ViTDetBlock
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, 0 if i in self.global_attn_indexes else self.window_size,
                    (g0, g0), self.use_rel_pos, self.qkv_bias, self.layer_norm_eps, self.dtype,
                    self.attention_impl, self.attention_chunk, name=f"layer_{i}")(x)
    return ConvNeck(self.out_chans, 1e-6, self.dtype, name="neck")(x)


class ViTNeckEncoder(nn.Module):
  """One of our :class:`VisionTransformer` s as a SAM image encoder: its patch tokens as a grid,
  then :class:`ConvNeck` to ``out_chans``. Params: ``encoder`` (the ViT, restorable from any
  pretraining checkpoint of this project) and ``neck``."""
  encoder: vit.VisionTransformer
  out_chans: int = 256

  @property
  def patch_size(self) -> int:
    return self.encoder.size.patch_size

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    b, h, w, _ = images.shape
    p = self.patch_size
    tokens = self.encoder(images, deterministic=deterministic)
    x = tokens[:, self.encoder.num_prefix_tokens:].reshape(b, h // p, w // p, tokens.shape[-1])
    return ConvNeck(self.out_chans, 1e-6, self.encoder.dtype, name="neck")(x)
