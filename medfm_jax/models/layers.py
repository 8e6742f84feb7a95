"""Transformer building blocks with logical axis names on every parameter and activation.

Logical names: parameters use ``embed, heads, kv, mlp, patch, vocab, layers``; activations use
``batch, seq, act_embed, act_heads, act_kv, act_mlp``. ``medfm_jax.parallel.mesh.LOGICAL_RULES`` maps
them to mesh axes. Attention keeps explicit per-head 3-D kernels and calls
``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when available).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import tpu_attention
from medfm_jax.parallel import mesh as mesh_lib

Dtype = Any
constrain = mesh_lib.constrain

default_kernel_init = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def param_with_axes(module: nn.Module, name: str, init: Callable, shape, axes):
  """Creates a float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def exact_gelu(x):
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": exact_gelu, "gelu_tanh": jax.nn.gelu, "quick_gelu": quick_gelu, "relu": jax.nn.relu}


class DenseGeneral(nn.Module):
  """Dense layer with a logically named kernel ``[*in_shape, *out_shape]`` (Flax layout: in, out)."""
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  contract_dims: int = 1           # trailing input dims that are contracted
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.contract_dims:]
    n_in = len(in_shape)
    kernel_shape = (*in_shape, *self.features)

    def init(key, shape, dtype):  # fan-in/out computed over the flattened matrix view
      flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
      return self.kernel_init(key, flat, dtype).reshape(shape)

    kernel = param_with_axes(self, "kernel", init, kernel_shape, self.kernel_axes)
    x_axes = tuple(range(x.ndim - n_in, x.ndim))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((x_axes, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, "bias", zeros, self.features, self.kernel_axes[n_in:])
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """2-D convolution over NHWC inputs with a logically named HWIO kernel ``[kh, kw, in, out]``.

  ``padding`` is symmetric per spatial side (PyTorch ``Conv2d(padding=...)`` semantics).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  kernel_axes: tuple[str | None, ...] = (None, None, None, "embed")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = param_with_axes(self, "kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                             self.kernel_axes)
    pad = ((self.padding, self.padding),) * 2
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype),
                                     (self.strides, self.strides), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + param_with_axes(self, "bias", zeros, (self.features,), self.kernel_axes[-1:]).astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 with named scale/bias; returns the compute dtype."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * param_with_axes(self, "scale", nn.initializers.ones, (d,), ("embed",))
    if self.use_bias:
      y = y + param_with_axes(self, "bias", zeros, (d,), ("embed",))
    return y.astype(self.dtype)


_CUDNN_SEQ_MULTIPLE = 8


def dot_product_attention(q, k, v, mask=None, is_causal: bool = False, implementation: str | None = None):
  """``jax.nn.dot_product_attention`` on ``[batch, seq, heads, kv]``; with ``implementation='cudnn'``
  for any sequence length and any mask; ``'pallas'``: the TPU flash kernel
  (:func:`tpu_attention.flash_attention`, key-padding masks).

  cuDNN's flash kernel (as JAX 0.10-0.11 call it) refuses odd sequence lengths in training
  (ViT-B/16 at 224 px has 197 tokens) and masks broadcast over queries ("Bias must have same seq
  length as QKV"). So the cuDNN path pads the sequence to a multiple of 8, hides the padded keys
  (by key lengths without a mask, else in a mask broadcast to ``[b, h, T, S]``) and drops the
  padded queries' outputs.
  """
  if implementation == "pallas":
    return tpu_attention.flash_attention(q, k, v, mask, is_causal)
  if implementation != "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=implementation)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  pad_t, pad_s = (-t) % _CUDNN_SEQ_MULTIPLE, (-s) % _CUDNN_SEQ_MULTIPLE
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  q, k, v = pad(q, pad_t), pad(k, pad_s), pad(v, pad_s)
  if mask is None:
    lengths = {"key_value_seq_lengths": jnp.full((b,), s, jnp.int32)} if pad_s else {}
    out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn", **lengths)
  else:
    full = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
    full = jnp.pad(full, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)), constant_values=False)
    if pad_t:   # padded queries (dropped below) see key 0, so that no row is empty
      full = full.at[:, :, t:, 0].set(True)
    out = jax.nn.dot_product_attention(q, k, v, mask=full, is_causal=is_causal, implementation="cudnn")
  return out[:, :t]


class Attention(nn.Module):
  """Multi-head self-attention: q/k/v kernels ``[embed, heads, kv]``, out kernel ``[heads, kv, embed]``."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  implementation: str | None = None    # None = XLA; 'cudnn' / 'pallas': flash attention on GPU / TPU

  @nn.compact
  def __call__(self, x, mask=None, is_causal: bool = False):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    head_dim = d // self.num_heads
    proj = lambda name: DenseGeneral((self.num_heads, head_dim), ("embed", "heads", "kv"),
                                     use_bias=self.qkv_bias, dtype=self.dtype, name=name)(x)
    q, k, v = proj("query"), proj("key"), proj("value")      # [batch, seq, heads, kv]
    q, k, v = (constrain(t, ("batch", "seq", "act_heads", "act_kv")) for t in (q, k, v))
    out = dot_product_attention(q, k, v, mask, is_causal, self.implementation)
    out = constrain(out, ("batch", "seq", "act_heads", "act_kv"))
    y = DenseGeneral((d,), ("heads", "kv", "embed"), contract_dims=2, dtype=self.dtype, name="out")(out)
    return constrain(y, ("batch", "seq", "act_embed"))


class Mlp(nn.Module):
  """Two-layer MLP (``fc1 -> act -> fc2``) or SwiGLU (``w12 -> silu-gate -> w3``)."""
  hidden_dim: int
  activation: str = "gelu"
  swiglu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if self.swiglu:
      h = DenseGeneral((2, self.hidden_dim), ("embed", None, "mlp"), dtype=self.dtype, name="w12")(x)
      h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
    else:
      h = DenseGeneral((self.hidden_dim,), ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
      h = ACTIVATIONS[self.activation](h)
    h = constrain(h, ("batch", "seq", "act_mlp"))
    y = DenseGeneral((d,), ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
    return constrain(y, ("batch", "seq", "act_embed"))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (rng stream ``dropout``).

  ``rate`` is a call argument so that a scanned stack can feed each layer its own rate.
  """

  @nn.compact
  def __call__(self, x, rate, deterministic: bool):
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = param_with_axes(self, "gamma", nn.initializers.constant(self.init_value),
                            (x.shape[-1],), ("embed",))
    return x * gamma.astype(x.dtype)


class Adapter(nn.Module):
  """Bottleneck adapter (Houlsby et al., 2019) on a sublayer output: ``y + up(gelu(down(y)))``.

  ``up`` is zero-initialised (kernel and bias), so at init the output equals ``y`` bitwise.
  """
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    h = DenseGeneral((self.dim,), ("embed", "mlp"), dtype=self.dtype, name="down")(y)
    h = DenseGeneral((y.shape[-1],), ("mlp", "embed"), dtype=self.dtype, kernel_init=zeros,
                     name="up")(exact_gelu(h))
    return y + h


ADAPTER_PLACES = ("attn", "mlp", "both")


class Block(nn.Module):
  """Pre-LN transformer block: ``x + ls(attn(ln(x)))``, ``x + ls(mlp(ln(x)))`` with drop-path;
  ``post_ln``: BERT's post-LN order ``ln(x + ls(attn(x)))``, ``ln(x + ls(mlp(x)))`` (the same
  ``norm1`` / ``norm2`` params, after each residual sum instead of before each sublayer).

  ``adapter_dim > 0`` inserts bottleneck :class:`Adapter` s (``adapter_attn``/``adapter_mlp``) on
  the attention and/or MLP output (``adapter_where``: 'attn' | 'mlp' | 'both').
  """
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  layer_scale_init: float = 0.0        # 0 disables LayerScale
  activation: str = "gelu"
  swiglu: bool = False
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  adapter_dim: int = 0                 # 0: no adapters
  adapter_where: str = "both"
  causal: bool = False                 # causal self-attention (text towers)
  post_ln: bool = False                # LayerNorm after each residual sum (BERT) instead of before

  def _adapt(self, y, place: str):
    if not self.adapter_dim or self.adapter_where not in (place, "both"):
      return y
    return Adapter(self.adapter_dim, self.dtype, name=f"adapter_{place}")(y)

  @nn.compact
  def __call__(self, x, drop_rate=0.0, deterministic: bool = True, mask=None):
    """``mask``: optional bool attention mask broadcastable to ``[b, heads, q, k]`` (True = attend)."""
    if self.adapter_where not in ADAPTER_PLACES:
      raise ValueError(f"model.adapter_where={self.adapter_where!r}: allowed {ADAPTER_PLACES}")
    x = constrain(x, ("batch", "seq", "act_embed"))
    ln = lambda name: LayerNorm(self.layer_norm_eps, self.dtype, name=name)
    scale = lambda y, name: LayerScale(self.layer_scale_init, name=name)(y) if self.layer_scale_init else y
    pre = (lambda name, y: y) if self.post_ln else (lambda name, y: ln(name)(y))
    post = (lambda name, y: ln(name)(y)) if self.post_ln else (lambda name, y: y)
    y = Attention(self.num_heads, self.qkv_bias, self.dtype, self.attention_impl, name="attn")(
        pre("norm1", x), mask=mask, is_causal=self.causal)
    x = post("norm1", x + DropPath()(scale(self._adapt(y, "attn"), "ls1"), drop_rate, deterministic))
    y = Mlp(self.mlp_dim, self.activation, self.swiglu, self.dtype, name="mlp")(pre("norm2", x))
    x = post("norm2", x + DropPath()(scale(self._adapt(y, "mlp"), "ls2"), drop_rate, deterministic))
    return x


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """``[sin(pos*w), cos(pos*w)]`` with ``w_i = 1/10000^(2i/dim)``; returns ``[len(pos), dim]``."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding ``[(1+)grid_h*grid_w, dim]`` (MAE convention).

  The first half of the channels encodes the column (w) index, the second half the row (h);
  patches are in row-major order; an optional leading all-zero row stands for the cls token.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding dim must be divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def sincos_3d(dim: int, grid_d: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
  """Fixed 3-D sin-cos position embedding ``[(1+)grid_d*grid_h*grid_w, dim]``.

  The 2-D convention extended by one axis: ``2*(dim//6)`` channels each encode the w, h and d
  index (in that order); any remaining ``dim % 6`` channels are zero. Patches are in (d, h, w)
  row-major order; an optional leading all-zero row stands for the cls token.
  """
  e = 2 * (dim // 6)
  if e == 0:
    raise ValueError(f"3-D sin-cos embedding dim must be >= 6, got {dim}")
  d, h, w = np.meshgrid(np.arange(grid_d), np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([sincos_1d(e, w), sincos_1d(e, h), sincos_1d(e, d),
                        np.zeros((d.size, dim - 3 * e))], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def sincos_nd(dim: int, grid: tuple[int, ...], cls_token: bool = False) -> np.ndarray:
  """:func:`sincos_2d` or :func:`sincos_3d` by the number of grid axes."""
  if len(grid) == 2:
    return sincos_2d(dim, *grid, cls_token=cls_token)
  if len(grid) == 3:
    return sincos_3d(dim, *grid, cls_token=cls_token)
  raise ValueError(f"sin-cos position embedding for a {len(grid)}-D grid {grid}: allowed 2-D or 3-D")


def gather_tokens(x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
  """``x[b, ids[b, i]]`` for ``x [b, n, d]``, ``ids [b, m]`` -> ``[b, m, d]``, as a one-hot matmul.

  Exact (HIGHEST precision, one nonzero per row) and, unlike ``take_along_axis``, its gradient is a
  matmul rather than a scatter-add, which is slow on CPU and TPU.
  """
  onehot = jax.nn.one_hot(ids, x.shape[1], dtype=x.dtype)
  return jnp.einsum("bmn,bnd->bmd", onehot, x, precision=jax.lax.Precision.HIGHEST)


def interpolate_pos_embed(pos: jnp.ndarray, old_hw: tuple[int, ...], new_hw: tuple[int, ...],
                          num_prefix: int = 1) -> jnp.ndarray:
  """Resizes learned patch position embeddings ``[1, prefix+prod(old grid), d]`` to a new 2-D
  (bicubic) or 3-D (tricubic) grid; prefix tokens are kept."""
  if tuple(old_hw) == tuple(new_hw):
    return pos
  if len(old_hw) != len(new_hw):
    raise ValueError(f"position embedding grid {tuple(old_hw)} cannot be resized to {tuple(new_hw)}")
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  d = grid.shape[-1]
  grid = grid.reshape(1, *old_hw, d)
  grid = jax.image.resize(grid, (1, *new_hw, d), method="bicubic" if len(new_hw) == 2 else "tricubic")
  return jnp.concatenate([prefix, grid.reshape(1, -1, d).astype(pos.dtype)], axis=1)
