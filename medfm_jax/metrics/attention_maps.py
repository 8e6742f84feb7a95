"""Last-layer [CLS] self-attention maps of a ViT (DINO's Fig. 1), as arrays and as a PNG grid."""
from __future__ import annotations

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medfm_jax import storage
from medfm_jax.models import vit


def last_block_input(model: vit.VisionTransformer, params, images: jax.Array):
  """``(x, attn_params, model)``: the last block's ``norm1`` output ``[b, T, d]`` (float32) and
  its attention params, captured by rerunning the model (no hooks in the model code); scanned
  encoders are unstacked (the returned model is the unrolled one)."""
  params = nn.unbox(params)
  if model.scan:
    params = dict(params, encoder=vit.unstack_layers(params["encoder"]))
    model = model.clone(scan=False)
  last = f"layer_{model.size.depth - 1}"
  is_target = lambda mdl, _: mdl.path == ("encoder", last, "norm1")
  _, state = model.apply({"params": params}, images, capture_intermediates=is_target,
                         mutable=["intermediates"])
  x = state["intermediates"]["encoder"][last]["norm1"]["__call__"][0].astype(jnp.float32)
  return x, params["encoder"][last]["attn"], model


def project(x: jax.Array, p: dict) -> jax.Array:
  """``[b, T, d] -> [b, T, heads, head_dim]`` with a query/key/value param dict, in float32."""
  y = jnp.einsum("btd,dhk->bthk", x, p["kernel"].astype(jnp.float32), precision="highest")
  return y + p["bias"].astype(jnp.float32) if "bias" in p else y


def cls_attention(model: vit.VisionTransformer, params, images: jax.Array,
                  patches_only: bool = True) -> jax.Array:
  """``[b, heads, gh, gw]``: softmax attention of the cls query over the patch keys in the last
  block (register tokens are in the softmax, as in the model, but not in the map).
  ``patches_only=False`` returns all keys ``[b, heads, T]`` (prefix tokens first)."""
  x, attn, model = last_block_input(model, params, images)
  q, k = project(x, attn["query"]), project(x, attn["key"])
  logits = jnp.einsum("bhk,bshk->bhs", q[:, 0], k, precision="highest") / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)
  if not patches_only:
    return probs
  p = model.size.patch_size
  grid = (images.shape[1] // p, images.shape[2] // p)
  return probs[:, :, 1 + model.num_registers:].reshape(*probs.shape[:2], *grid)


def attention_grid(images: np.ndarray, maps: np.ndarray, mean, std) -> np.ndarray:
  """uint8 ``[rows*H, (2+heads)*W]``: per example the image, the head-mean map and each head's
  map (each map min-max scaled, nearest-upsampled to the image size)."""
  images = np.asarray(images, np.float32)
  n, h, w, _ = images.shape
  gray = (images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)).mean(-1)
  maps = np.asarray(maps, np.float32)
  maps = np.concatenate([maps.mean(1, keepdims=True), maps], axis=1)       # [n, 1+heads, gh, gw]
  lo = maps.min(axis=(2, 3), keepdims=True)
  hi = maps.max(axis=(2, 3), keepdims=True)
  maps = (maps - lo) / np.maximum(hi - lo, 1e-12)
  up = maps.repeat(h // maps.shape[2], axis=2).repeat(w // maps.shape[3], axis=3)
  rows = [np.concatenate([np.clip(gray[i], 0, 1)] + list(up[i]), axis=1) for i in range(n)]
  return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def write_attention_png(path, images: np.ndarray, maps: np.ndarray, mean, std,
                        scale: int = 4) -> None:
  """Writes :func:`attention_grid` as a grayscale PNG (``path`` local or URL), upscaled ``scale``
  times."""
  grid = attention_grid(images, maps, mean, std)
  png = io.BytesIO()
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                               Image.NEAREST).save(png, "PNG")
  storage.write_bytes(path, png.getvalue())
