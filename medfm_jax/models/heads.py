"""Projection heads for self-distillation objectives (DINO / DINOv2 / iBOT).

``DinoHead``: MLP ``d -> hidden -> ... -> bottleneck`` (exact GELU between layers, none after the
last), L2 normalisation, then a weight-normalised linear layer ``bottleneck -> K`` without bias
(``torch.nn.utils.weight_norm`` with ``dim=0``). The last layer lives under ``last_layer`` so a
trainer can freeze it by path (``params/last_layer/v`` and, if present, ``params/last_layer/g``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medfm_jax.models import layers

Dtype = Any

# timm ``trunc_normal_(std=.02)`` as used by DINO: truncated at +-2 absolute (= +-100 std), so in
# effect N(0, 0.02^2). ``jax`` truncation bounds are in units of the standard deviation.
dino_trunc_normal = nn.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
# PyTorch ``nn.Linear`` default weight init, U(+-1/sqrt(fan_in)): DINO's last layer is created after
# ``apply(_init_weights)`` and keeps it (the scale of ``v`` sets the effective step size on it).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12, axis: int = -1) -> jnp.ndarray:
  """``x / max(||x||, eps)`` along ``axis`` (``torch.nn.functional.normalize`` semantics)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class WeightNormDense(nn.Module):
  """Bias-free linear layer with weight norm: kernel column ``k = g_k * v[:, k] / ||v[:, k]||``.

  ``v`` is ``[in, features]`` with logical names ``("embed", "vocab")``. With ``fixed_gain`` the
  gain is the constant 1 and no ``g`` parameter exists; otherwise ``g [features]`` (init 1).
  """
  features: int
  fixed_gain: bool = True
  dtype: Dtype = jnp.float32

  def effective_kernel(self, v: jnp.ndarray, g: jnp.ndarray | None) -> jnp.ndarray:
    w = v / jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    return w if g is None else w * g[None, :]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    v = layers.param_with_axes(self, "v", torch_linear_init, (x.shape[-1], self.features),
                               ("embed", "vocab"))
    g = None
    if not self.fixed_gain:
      g = layers.param_with_axes(self, "g", nn.initializers.ones, (self.features,), ("vocab",))
    w = self.effective_kernel(v, g)
    return jnp.einsum("...d,dk->...k", x.astype(self.dtype), w.astype(self.dtype))


class DinoHead(nn.Module):
  """DINO projection head; maps ``[..., d]`` features to ``[..., out_dim]`` float32 logits.

  Kernels of the MLP: first ``("embed", "mlp")``, later ones ``("mlp", "embed")``; biases carry
  the output name. ``norm_eps``: 1e-12 as in DINO (DINOv2 uses 1e-6).
  """
  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.num_layers < 1:
      raise ValueError(f"DinoHead.num_layers must be >= 1, got {self.num_layers}")
    dims = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
    h = x
    for i, dim in enumerate(dims):
      axes = ("embed", "mlp") if i == 0 else ("mlp", "embed")
      h = layers.DenseGeneral((dim,), axes, dtype=self.dtype, kernel_init=dino_trunc_normal,
                              name=f"mlp_{i}")(h)
      if i < len(dims) - 1:
        h = layers.exact_gelu(h)
    h = l2_normalize(h.astype(jnp.float32), self.norm_eps)
    logits = WeightNormDense(self.out_dim, fixed_gain=self.norm_last_layer, dtype=self.dtype,
                             name="last_layer")(h)
    return logits.astype(jnp.float32)


def last_layer_mask(params: Any) -> Any:
  """Pytree of bools, True for leaves under a ``last_layer`` module (for freezing via optax)."""
  def is_last(path, _):
    return any(getattr(k, "key", None) == "last_layer" for k in path)
  return jax.tree_util.tree_map_with_path(is_last, params)


POOLS = ("cls", "mean")


def pool_tokens(tokens: jnp.ndarray, pool: str, num_prefix: int) -> jnp.ndarray:
  """Encoder output ``[b, prefix + n, d]`` -> ``[b, d]``: the cls token, or the mean of the patch
  tokens (prefix tokens — cls, registers, prompts — excluded)."""
  if pool == "cls":
    return tokens[:, 0]
  if pool == "mean":
    return tokens[:, num_prefix:].mean(axis=1)
  raise ValueError(f"pool={pool!r}: allowed {POOLS}")


class ClassifierHead(nn.Module):
  """Pooled features -> (``fc_norm`` LayerNorm for mean pooling, as MAE fine-tuning) -> linear
  logits ``[b, num_classes]`` float32. Kernel ~ N(0, ``init_std``^2), bias 0."""
  num_classes: int
  pool: str = "cls"
  init_std: float = 0.01
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, num_prefix: int = 1) -> jnp.ndarray:
    x = pool_tokens(tokens, self.pool, num_prefix)
    if self.pool == "mean":
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="fc_norm")(x)
    logits = layers.DenseGeneral((self.num_classes,), ("embed", None), dtype=self.dtype,
                                 kernel_init=nn.initializers.normal(self.init_std), name="linear")(x)
    return logits.astype(jnp.float32)
