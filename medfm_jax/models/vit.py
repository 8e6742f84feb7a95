"""Vision Transformer encoder (pre-LN, cls token, fixed sin-cos or learned position embeddings).

Variants are looked up by strings like ``"B/16"`` (width/depth/heads from :data:`VARIANTS`, patch
size after the slash). The block stack can run unrolled (``layer_0 ... layer_{n-1}``) or as one
``nn.scan`` (``layers``, params stacked on a leading axis); :func:`stack_layers` and
:func:`unstack_layers` convert between the two parameter trees.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import layers, tpu_attention
from medfm_jax.models.layers import constrain

# name: (width, depth, heads, mlp_dim)
VARIANTS = {
    "Mu": (96, 4, 3, 384),        # CPU smoke tests and demos
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1536, 40, 24, 6144),    # DINOv2 giant
    "PrimusM": (864, 16, 12, 3456),   # Primus-M (Wald et al., 2025), the OpenMind 3D encoder
}


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int


def parse_variant(variant: str) -> ViTSize:
  """``"B/16"`` -> ViTSize(768, 12, 12, 3072, 16)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit() or int(patch) <= 0:
    raise ValueError(f"model.variant={variant!r}: expected NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)} and a positive integer patch size, e.g. 'B/16'")
  return ViTSize(*VARIANTS[name], int(patch))


def patchify(images: jnp.ndarray, patch: int) -> jnp.ndarray:
  """``[b, H, W, c] -> [b, (H/p)*(W/p), p*p*c]``, patches row-major, pixels in (p, q, c) order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: jnp.ndarray, patch: int, grid_hw: tuple[int, int], channels: int) -> jnp.ndarray:
  """Inverse of :func:`patchify`."""
  b = x.shape[0]
  gh, gw = grid_hw
  x = x.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch, gw * patch, channels)


def patchify3d(volumes: jnp.ndarray, patch: tuple[int, int, int]) -> jnp.ndarray:
  """``[b, D, H, W, c] -> [b, gd*gh*gw, pd*ph*pw*c]``, patches (d, h, w) row-major, voxels in
  (pd, ph, pw, c) order."""
  b, d, h, w, c = volumes.shape
  pd, ph, pw = patch
  x = volumes.reshape(b, d // pd, pd, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify3d(x: jnp.ndarray, patch: tuple[int, int, int], grid: tuple[int, int, int],
                 channels: int) -> jnp.ndarray:
  """Inverse of :func:`patchify3d`."""
  (pd, ph, pw), (gd, gh, gw) = patch, grid
  x = x.reshape(x.shape[0], gd, gh, gw, pd, ph, pw, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(x.shape[0], gd * pd, gh * ph, gw * pw, channels)


def patchify_any(x: jnp.ndarray, patch: tuple[int, ...]) -> jnp.ndarray:
  """:func:`patchify` of images (``len(patch) == 2``, square) or :func:`patchify3d` of volumes."""
  if len(patch) == 3:
    return patchify3d(x, patch)
  return patchify(x, patch[0])


def unpatchify_any(x: jnp.ndarray, patch: tuple[int, ...], grid: tuple[int, ...], channels: int):
  """Inverse of :func:`patchify_any`."""
  if len(patch) == 3:
    return unpatchify3d(x, patch, grid, channels)
  return unpatchify(x, patch[0], grid, channels)


def patch_grid(spatial: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
  """Token grid of an input with spatial shape ``spatial``; one-line error when not divisible."""
  if any(s % p for s, p in zip(spatial, patch)):
    raise ValueError(f"input size {'x'.join(map(str, spatial))} is not divisible by the patch size "
                     f"{'x'.join(map(str, patch))}")
  return tuple(s // p for s, p in zip(spatial, patch))


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMATS = ("none", *_REMAT_POLICIES)          # model.remat


class Encoder(nn.Module):
  """A stack of pre-LN (``post_ln``: post-LN, BERT) blocks with linearly increasing drop-path,
  unrolled or scanned."""
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  drop_path: float = 0.0
  layer_scale_init: float = 0.0
  activation: str = "gelu"
  swiglu: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"                 # 'none' | 'full' | 'dots'
  scan: bool = False
  attention_impl: str | None = None
  qkv_bias: bool = True
  adapter_dim: int = 0                # bottleneck adapters in every block (0 = none)
  adapter_where: str = "both"         # 'attn' | 'mlp' | 'both'
  causal: bool = False                # causal self-attention (text towers)
  post_ln: bool = False               # post-LN blocks (BERT-style text towers)

  @nn.compact
  def __call__(self, x, deterministic: bool = True, mask=None, collect: tuple[int, ...] = ()):
    """``mask``: optional bool attention mask broadcastable to ``[b, heads, q, k]`` (True = attend).
    ``collect``: block indices whose outputs are also returned, ``(x, [outputs])`` (UNETR skips;
    a scanned stack then keeps every block's output as the scan's per-step result)."""
    block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, qkv_bias=self.qkv_bias,
                        layer_norm_eps=self.layer_norm_eps, layer_scale_init=self.layer_scale_init,
                        activation=self.activation, swiglu=self.swiglu, dtype=self.dtype,
                        attention_impl=self.attention_impl, adapter_dim=self.adapter_dim,
                        adapter_where=self.adapter_where, causal=self.causal, post_ln=self.post_ln)
    rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else np.zeros(1)
    block_cls = layers.Block
    if self.remat != "none":
      if self.remat not in _REMAT_POLICIES:
        raise ValueError(f"model.remat={self.remat!r}: allowed {REMATS}")
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[self.remat], static_argnums=(3,))
    if not self.scan:
      hidden = []
      for i in range(self.depth):
        x = block_cls(**block_kwargs, name=f"layer_{i}")(x, float(rates[i]), deterministic, mask)
        hidden.append(x)
      return (x, [hidden[i] for i in collect]) if collect else x
    keep = bool(collect)

    class ScanBody(nn.Module):
      @nn.compact
      def __call__(self, carry, rate, deterministic, mask):
        y = block_cls(**block_kwargs, name="block")(carry, rate, deterministic, mask)
        return y, (y if keep else None)

    scanned = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, hidden = scanned(name="layers")(x, jnp.asarray(rates, jnp.float32), deterministic, mask)
    return (x, [hidden[i] for i in collect]) if collect else x


def stack_layers(params: dict, prefix: str = "layer_", stack=jnp.stack) -> dict:
  """Unrolled ``{layer_i: p}`` -> scanned ``{layers: {block: stacked p}}``, at every nesting level
  (each stack keeps its own depth, e.g. an MAE encoder and its shallower decoder). ``stack``:
  ``np.stack`` stacks numpy params on the host (weight conversion: nothing to compile)."""
  ids = sorted(int(k[len(prefix):]) for k in params if k.startswith(prefix) and k[len(prefix):].isdigit())
  if ids != list(range(len(ids))):
    raise ValueError(f"layer keys {ids} are not 0..n-1")
  out = {k: stack_layers(v, prefix, stack) if isinstance(v, dict) else v
         for k, v in params.items() if not (k.startswith(prefix) and k[len(prefix):].isdigit())}
  if ids:
    out["layers"] = {"block": jax.tree.map(lambda *xs: stack(xs), *[params[f"{prefix}{i}"] for i in ids])}
  return out


def unstack_layers(params: dict, prefix: str = "layer_") -> dict:
  """Inverse of :func:`stack_layers`."""
  out = {}
  for k, v in params.items():
    if k == "layers" and isinstance(v, dict) and set(v) == {"block"}:
      depth = jax.tree.leaves(v)[0].shape[0]
      for i in range(depth):
        out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], v["block"])
    else:
      out[k] = unstack_layers(v, prefix) if isinstance(v, dict) else v
  return out


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection as one matmul over patchified pixels (= a stride-p conv).

  ``patch_size``: an int (square 2-D patches of ``[b, H, W, c]`` images) or a (pd, ph, pw) tuple
  (cubic or anisotropic 3-D patches of ``[b, D, H, W, c]`` volumes).
  """
  patch_size: int | tuple[int, ...]
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    patch = self.patch_size
    x = patchify_any(images, patch) if isinstance(patch, tuple) else patchify(images, patch)
    x = constrain(x, ("batch", "seq", None))
    return layers.DenseGeneral((self.width,), ("patch", "embed"), dtype=self.dtype,
                               name="proj")(x)


class ConvStem(nn.Module):
  """Convolutional stem (ViT-C, Xiao et al. 2021, "Early convolutions help transformers see better").

  ``log2(patch_size)`` 3x3 stride-2 convolutions (``conv_i``; channels ``width / 2^(n-1-i)``, so the
  last has ``width``), each followed by exact GELU, then a 1x1 projection to ``width`` (``proj``).
  Same output as :class:`PatchEmbed`: ``[b, (H/p)*(W/p), width]``, one token per ``p x p`` patch in
  row-major order, but each token sees ``2p - 1`` px around its patch, which gives the transformer
  the locality prior small lesions need. No normalisation between the convolutions: the paper's
  BatchNorm needs batch statistics the functional model does not keep, and a LayerNorm over
  channels (measured on the phantoms) discards the local contrast the first layer sees.
  Kernels start as PyTorch's ``Conv2d`` default (uniform, variance ``1 / (3 fan_in)``).
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    n = conv_stem_depth(self.patch_size, self.width)
    init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    x = constrain(images, ("batch", None, None, None))
    for i in range(n):
      x = layers.Conv(self.width >> (n - 1 - i), 3, strides=2, padding=1, dtype=self.dtype,
                      kernel_init=init, name=f"conv_{i}")(x)
      x = constrain(layers.exact_gelu(x), ("batch", None, None, "act_embed"))
    b, gh, gw, c = x.shape
    x = constrain(x.reshape(b, gh * gw, c), ("batch", "seq", "act_embed"))
    return layers.DenseGeneral((self.width,), ("patch", "embed"), dtype=self.dtype, name="proj")(x)


PATCH_EMBEDS = ("patch", "conv")
CLS_POOLS = ("token", "max", "mean")
POS_EMBEDS = ("sincos2d", "sincos3d", "learned")


def conv_stem_depth(patch_size: int, width: int) -> int:
  """Number of stride-2 convolutions of the conv stem; one-line error when it cannot be built."""
  n = int(patch_size).bit_length() - 1
  if patch_size < 2 or patch_size != 1 << n or width % (1 << (n - 1)):
    raise ValueError(f"model.patch_embed='conv': needs a power-of-two patch size >= 2 and a width "
                     f"divisible by patch_size/2, got patch {patch_size}, width {width}")
  return n


class VisionTransformer(nn.Module):
  """ViT encoder. ``__call__(images, keep_ids=None)`` -> ``[b, prefix + n_kept, width]`` after the final LN.

  Volumes: ``images [b, D, H, W, c]`` are cut into 3-D patches (cubic ``variant`` patch size, or
  ``patch_3d``), tokens in (d, h, w) row-major order, with 3-D position embeddings
  (``pos_embed='sincos3d'`` or 'learned' on the ``volume_size`` grid, resampled tricubically);
  the blocks, scan, remat and sharding are the 2-D ones. Only ``patch_embed='patch'``.

  ``keep_ids [b, n_kept]`` selects which patch tokens enter the blocks (MAE); position embeddings
  are added before selection. Prefix tokens: cls, then ``num_registers`` register tokens.
  ``patch_mask [b, n]`` (True = masked; needs ``mask_token=True``) replaces those patch embeddings
  by a learned mask token before position embeddings are added (iBOT / DINOv2).
  """
  variant: str = "B/16"
  image_size: int = 224                # grid the learned position embedding is created for
  pos_embed: str = "sincos2d"          # 'sincos2d' | 'sincos3d' (fixed) | 'learned'
  # Volumes: the (d, h, w) patch shape (None: cubic, the variant's patch size) and the
  # (D, H, W) input the learned position embedding is created for (None: image_size cubed).
  patch_3d: tuple[int, int, int] | None = None
  volume_size: tuple[int, int, int] | None = None
  layer_norm_eps: float = 1e-6
  drop_path: float = 0.0
  layer_scale_init: float = 0.0
  num_registers: int = 0
  activation: str = "gelu"
  swiglu: bool = False
  final_norm: bool = True
  mask_token: bool = False             # learned [MASK] embedding for patch_mask (iBOT)
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention_impl: str | None = None
  qkv_bias: bool = True
  # Optional overrides of the variant's sizes (imported checkpoints with off-table shapes).
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  # Parameter-efficient fine-tuning (defaults add nothing): learned prompt tokens after the prefix
  # tokens (VPT-shallow), bottleneck adapters in every block (see layers.Block).
  num_prompts: int = 0
  adapter_dim: int = 0
  adapter_where: str = "both"
  # CLIP / SigLIP options (defaults add nothing): a LayerNorm on the embedded tokens before the
  # blocks (CLIP's ln_pre); no cls token (SigLIP pools with an attention head instead).
  ln_pre: bool = False
  class_token: bool = True
  # Patch embedding: 'patch' (one linear map per non-overlapping patch, the standard ViT) |
  # 'conv' (:class:`ConvStem`, the ViT-C convolutional stem; same tokens, overlapping receptive fields).
  patch_embed: str = "patch"
  # What the first output token holds (every 'cls' consumer reads it: CLIP, classifier heads, DINO,
  # feature extraction): 'token' (the cls token's final state) | 'max' / 'mean' (the max / mean over
  # the final patch tokens, after the final norm; needs class_token). Max pooling lets a small local
  # finding reach the pooled feature undiluted by the rest of the image.
  cls_pool: str = "token"

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in the output: cls, registers, prompts."""
    return int(self.class_token) + self.num_registers + self.num_prompts

  def patch_shape(self, ndim: int) -> tuple[int, ...]:
    """Patch shape for inputs with ``ndim`` spatial axes (2: images, 3: volumes)."""
    p = self.size.patch_size
    if ndim == 3:
      return tuple(self.patch_3d) if self.patch_3d else (p, p, p)
    return (p, p)

  def learned_grid(self, ndim: int) -> tuple[int, ...]:
    """The grid the learned position embedding is created for (then resampled to each input's):
    ``volume_size`` (default: ``image_size`` cubed) in patches for volumes, else the image grid."""
    if ndim == 3:
      return patch_grid(tuple(self.volume_size or (self.image_size,) * 3), self.patch_shape(3))
    return (self.image_size // self.size.patch_size,) * 2

  @property
  def size(self) -> ViTSize:
    overrides = {k: getattr(self, k) for k in ("width", "depth", "num_heads", "mlp_dim")
                 if getattr(self, k) is not None}
    return dataclasses.replace(parse_variant(self.variant), **overrides)

  @nn.compact
  def __call__(self, images, keep_ids=None, deterministic: bool = True, patch_mask=None,
               return_pre_norm: bool = False, return_hidden: tuple[int, ...] = ()):
    """``return_pre_norm``: also return the last block's output before the final LN (FLAVA feeds
    those states to its fusion encoder): ``(tokens, pre_norm_tokens)``. ``return_hidden``: block
    indices whose outputs (before any norm) are returned too: ``(tokens, [hidden])`` (UNETR)."""
    size = self.size
    b, *spatial, _ = images.shape
    if len(spatial) not in (2, 3):
      raise ValueError(f"input of shape {images.shape}: expected [b, H, W, c] images or "
                       "[b, D, H, W, c] volumes")
    patch = self.patch_shape(len(spatial))
    grid = patch_grid(tuple(spatial), patch)
    x = self._embed_patches(images.astype(self.dtype), patch, size.width)
    if self.mask_token:
      token = layers.param_with_axes(self, "mask_token", nn.initializers.zeros, (1, 1, size.width),
                                     (None, None, "embed"))
      if patch_mask is not None:
        x = jnp.where(patch_mask[..., None], token.astype(self.dtype), x)
    elif patch_mask is not None:
      raise ValueError("patch_mask needs a model built with mask_token=True (model.mask_token)")
    x = x + self._position_embedding(grid, size.width).astype(self.dtype)
    if keep_ids is not None:
      x = layers.gather_tokens(x, keep_ids)
    prefix = [self._token("cls_token", size.width, b)] if self.class_token else []
    if self.num_registers:
      prefix.append(self._token("registers", size.width, b, self.num_registers))
    if self.num_prompts:
      prefix.append(self._token("prompts", size.width, b, self.num_prompts))
    x = jnp.concatenate([t.astype(self.dtype) for t in prefix] + [x], axis=1)
    x = constrain(x, ("batch", "seq", "act_embed"))
    if self.ln_pre:
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="ln_pre")(x)
    x = Encoder(size.depth, size.num_heads, size.mlp_dim, self.layer_norm_eps, self.drop_path,
                self.layer_scale_init, self.activation, self.swiglu, self.dtype, self.remat,
                self.scan, self.attention_impl, self.qkv_bias, self.adapter_dim, self.adapter_where,
                name="encoder")(x, deterministic, collect=tuple(return_hidden))
    if return_hidden:
      x, hidden = x
    pre_norm = x
    if self.final_norm:
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)
    x = self._pool_into_cls(x)
    if return_hidden:
      return x, hidden
    return (x, pre_norm) if return_pre_norm else x

  def _pool_into_cls(self, x):
    """``cls_pool`` 'max' / 'mean': token 0 <- the pooled patch tokens ``x[:, num_prefix_tokens:]``."""
    if self.cls_pool == "token":
      return x
    if self.cls_pool not in CLS_POOLS:
      raise ValueError(f"model.cls_pool={self.cls_pool!r}: allowed {CLS_POOLS}")
    if not self.class_token:
      raise ValueError(f"model.cls_pool={self.cls_pool!r} needs model.class_token=True (its output slot)")
    patches = x[:, self.num_prefix_tokens:]
    if self.cls_pool == "max":
      # The maximum gathered at its argmax, not ``patches.max``: JAX's max gradient goes to the
      # entries equal to the forward maximum, and XLA may recompute ``patches`` in another fusion
      # with other rounding, so no entry is equal (gradient 0/0 = NaN at XLA's CPU optimisation
      # level 0, gradients lost at level 1). The gather reads the very values it differentiates.
      index = jnp.argmax(patches, axis=1)
      pooled = jnp.take_along_axis(patches, index[:, None], axis=1)[:, 0]
    else:
      pooled = patches.mean(axis=1)
    return constrain(jnp.concatenate([pooled[:, None], x[:, 1:]], axis=1), ("batch", "seq", "act_embed"))

  def _embed_patches(self, images, patch, width):
    """``[b, H, W, c] -> [b, (H/p)*(W/p), width]`` (or volumes -> ``[b, gd*gh*gw, width]``) by
    the configured patch embedding."""
    if self.patch_embed == "patch":
      return PatchEmbed(patch if len(patch) == 3 else patch[0], width, self.dtype,
                        name="patch_embed")(images)
    if self.patch_embed == "conv":
      if len(patch) == 3:
        raise ValueError("model.patch_embed='conv' is 2-D only; volumes use 'patch'")
      return ConvStem(patch[0], width, self.dtype, name="patch_embed")(images)
    raise ValueError(f"model.patch_embed={self.patch_embed!r}: allowed {PATCH_EMBEDS}")

  def _token(self, name, width, batch, n=1):
    init = nn.initializers.normal(0.02)
    tok = layers.param_with_axes(self, name, init, (1, n, width), (None, None, "embed"))
    return jnp.broadcast_to(tok, (batch, n, width))

  def _position_embedding(self, grid, width):
    """Patch position embeddings ``[1, prod(grid), width]`` (the cls token gets none / zeros)."""
    if self.pos_embed in ("sincos2d", "sincos3d"):
      if int(self.pos_embed[6]) != len(grid):
        raise ValueError(f"model.pos_embed={self.pos_embed!r} does not fit a {len(grid)}-D input; "
                         f"use 'sincos{len(grid)}d' or 'learned'")
      return jnp.asarray(layers.sincos_nd(width, grid))[None]
    if self.pos_embed == "learned":
      g0 = self.learned_grid(len(grid))
      pos = layers.param_with_axes(self, "pos_embed", nn.initializers.normal(0.02),
                                   (1, int(np.prod(g0)), width), (None, None, "embed"))
      return layers.interpolate_pos_embed(pos, g0, grid, num_prefix=0)
    raise ValueError(f"model.pos_embed={self.pos_embed!r}: allowed {POS_EMBEDS}")


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")   # model.attention_impl


def resolve_attention_impl(name: str, dtype) -> str:
  """'auto' -> cuDNN flash attention on GPU with a half-precision compute dtype, the Pallas flash
  kernel on TPU, else XLA (for the platform of ``tpu_attention.target()``)."""
  platform = tpu_attention.target()
  if name == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if platform == "gpu" and half else "pallas" if platform == "tpu" else "xla"
  if name == "pallas" and platform != "tpu":
    raise ValueError(f"model.attention_impl='pallas' (the TPU flash kernel) needs a TPU; this run "
                     f"is for {platform}")
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={name!r}: allowed {ATTENTION_IMPLS}")
  return name


_SIZE_FIELDS = ("width", "depth", "num_heads", "mlp_dim")


def size_overrides(model_cfg) -> dict[str, int]:
  """Non-zero ``model.{width,depth,num_heads,mlp_dim}`` fields (0 = the variant's value)."""
  return {k: int(model_cfg[k]) for k in _SIZE_FIELDS if model_cfg.get(k, 0)}


def size_from_config(model_cfg) -> ViTSize:
  """The encoder sizes: ``model.variant`` with any size overrides applied."""
  return dataclasses.replace(parse_variant(model_cfg.variant), **size_overrides(model_cfg))


def vit_from_config(config) -> VisionTransformer:
  """The encoder described by ``config.model`` at ``config.data.image_size`` and ``config.dtype``."""
  m = config.model
  return VisionTransformer(**size_overrides(m),
      variant=m.variant, image_size=config.data.image_size, pos_embed=m.get("pos_embed", "sincos2d"),
      layer_norm_eps=m.get("layer_norm_eps", 1e-6), drop_path=m.get("drop_path", 0.0),
      layer_scale_init=m.get("layer_scale_init", 0.0), num_registers=m.get("num_registers", 0),
      activation=m.get("activation", "gelu"), swiglu=m.get("swiglu", False),
      mask_token=m.get("mask_token", False),
      dtype=COMPUTE_DTYPES[config.dtype], remat=m.get("remat", "none"), scan=m.get("scan", False),
      attention_impl=resolve_attention_impl(m.get("attention_impl", "auto"), COMPUTE_DTYPES[config.dtype]),
      num_prompts=m.get("num_prompts", 0), adapter_dim=m.get("adapter_dim", 0),
      adapter_where=m.get("adapter_where", "both"), ln_pre=m.get("ln_pre", False),
      class_token=m.get("class_token", True), patch_embed=m.get("patch_embed", "patch"),
      cls_pool=m.get("cls_pool", "token"), patch_3d=patch_3d_from_config(m),
      volume_size=volume_size_from_config(config.data))


def learned_grid_from_config(model_cfg, data_cfg) -> tuple[int, ...]:
  """:meth:`VisionTransformer.learned_grid` of the encoder a config describes (also a saved
  config's plain dicts): the ``data.volume`` crop in patches, else the ``data.image_size`` grid."""
  patch = parse_variant(model_cfg["variant"]).patch_size
  volume = volume_size_from_config(data_cfg)
  if volume is not None:
    return patch_grid(volume, patch_3d_from_config(model_cfg) or (patch,) * 3)
  return (int(data_cfg["image_size"]) // patch,) * 2


def patch_3d_from_config(model_cfg) -> tuple[int, int, int] | None:
  """``model.patch_3d`` as a (pd, ph, pw) tuple (None when unset / empty: cubic patches)."""
  raw = model_cfg.get("patch_3d")
  if not raw:
    return None
  shape = tuple(int(p) for p in raw)
  if len(shape) != 3 or min(shape) <= 0:
    raise ValueError(f"model.patch_3d={tuple(raw)}: expected three positive ints (pd, ph, pw)")
  return shape


def volume_size_from_config(data_cfg) -> tuple[int, int, int] | None:
  """The (D, H, W) crop of ``data.volume.size`` (an int = cubic); None without ``data.volume``."""
  volume = data_cfg.get("volume")
  if not volume or not volume.get("size"):
    return None
  return tuple(int(v) for v in np.broadcast_to(np.asarray(volume["size"]), (3,)))
