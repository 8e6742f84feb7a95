"""MONAI ``UNETR`` state dicts <-> our :class:`medfm_jax.models.unetr.Unetr` params.

MONAI's UNETR (``monai.networks.nets.UNETR``: patch 16, 12 blocks, no cls token, learned position
embedding, fused ``qkv`` Linear, LayerNorm eps 1e-5, conv patch embedding) maps onto
:func:`build_unetr`'s model one tensor to one param, so a MONAI checkpoint (e.g. a UNETR trained on
BTCV) fine-tunes or evaluates here, and parity is testable with shared random weights::

  model, params = monai_unetr.load_monai_unetr(torch_model.state_dict(), in_channels=1,
                                               num_classes=14, img_size=(96, 96, 96), hidden_size=768,
                                               mlp_dim=3072, num_heads=12, feature_size=16)
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.interop import torch_io
from medfm_jax.interop.torch_io import entry
from medfm_jax.models import unetr, vit

DEPTH, PATCH = 12, 16        # fixed in MONAI's UNETR
_WHAT = "MONAI UNETR"


def build_unetr(num_classes: int, img_size, hidden_size: int = 768, mlp_dim: int = 3072,
                num_heads: int = 12, feature_size: int = 16, qkv_bias: bool = False) -> unetr.Unetr:
  """Our model with MONAI UNETR's architecture (its defaults, any size)."""
  encoder = vit.VisionTransformer(
      variant=f"B/{PATCH}", width=hidden_size, depth=DEPTH, num_heads=num_heads, mlp_dim=mlp_dim,
      pos_embed="learned", volume_size=tuple(img_size), class_token=False, qkv_bias=qkv_bias,
      layer_norm_eps=1e-5)
  return unetr.Unetr(encoder, num_classes, feature_size)


def _conv(w):           # torch Conv3d (out, in, kd, kh, kw) -> DHWIO
  return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


def _up(w):             # torch ConvTranspose3d (in, out, 2, 2, 2) -> (in, 2, 2, 2, out)
  return np.ascontiguousarray(w.transpose(0, 2, 3, 4, 1))


def _patch3d(w):        # (D, C, p, p, p) -> [p*p*p*C, D] in (pd, ph, pw, c) order
  return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))


def mapping(num_heads: int, qkv_bias: bool, state_keys) -> list[torch_io.Entry]:
  """MONAI names <-> our param paths for the given state dict's decoder blocks."""
  head = num_heads
  qkv = lambda w: tuple(torch_io.qkv_kernel(part, head) for part in np.split(w, 3, axis=0))
  m = [entry("vit.patch_embedding.position_embeddings", ("encoder", "pos_embed")),
       entry("vit.patch_embedding.patch_embeddings.weight", ("encoder", "patch_embed", "proj", "kernel"), _patch3d),
       entry("vit.patch_embedding.patch_embeddings.bias", ("encoder", "patch_embed", "proj", "bias")),
       *torch_io.norm_entries("vit.norm", ("encoder", "norm"))]
  for i in range(DEPTH):
    hf, ours = f"vit.blocks.{i}", ("encoder", "encoder", f"layer_{i}")
    m += torch_io.norm_entries(f"{hf}.norm1", (*ours, "norm1"))
    m += torch_io.norm_entries(f"{hf}.norm2", (*ours, "norm2"))
    m += torch_io.dense_entries(f"{hf}.mlp.linear1", (*ours, "mlp", "fc1"))
    m += torch_io.dense_entries(f"{hf}.mlp.linear2", (*ours, "mlp", "fc2"))
    m.append(torch_io.Entry((f"{hf}.attn.qkv.weight",),
                            tuple((*ours, "attn", n, "kernel") for n in ("query", "key", "value")),
                            qkv, None))
    if qkv_bias:
      m.append(torch_io.Entry((f"{hf}.attn.qkv.bias",),
                              tuple((*ours, "attn", n, "bias") for n in ("query", "key", "value")),
                              lambda b: tuple(x.reshape(head, -1) for x in np.split(b, 3)), None))
    m.append(entry(f"{hf}.attn.out_proj.weight", (*ours, "attn", "out", "kernel"),
                   lambda w: torch_io.out_kernel(w, head)))
    m.append(entry(f"{hf}.attn.out_proj.bias", (*ours, "attn", "out", "bias")))
  rules = [  # MONAI decoder tensor name (regex) -> our path (format groups), converter
      (r"encoder1\.layer\.(conv\d)\.conv\.weight", ("decoder", "encoder1", "{0}", "kernel"), _conv),
      (r"encoder(\d)\.transp_conv_init\.conv\.weight", ("decoder", "encoder{0}_up", "kernel"), _up),
      (r"encoder(\d)\.blocks\.(\d+)\.0\.conv\.weight", ("decoder", "encoder{0}_up{1}", "kernel"), _up),
      (r"encoder(\d)\.blocks\.(\d+)\.1\.(conv\d)\.conv\.weight", ("decoder", "encoder{0}_block{1}", "{2}", "kernel"), _conv),
      (r"decoder(\d)\.transp_conv\.conv\.weight", ("decoder", "decoder{m1}_up", "kernel"), _up),
      (r"decoder(\d)\.conv_block\.(conv\d)\.conv\.weight", ("decoder", "decoder{m1}_block", "{1}", "kernel"), _conv),
      (r"out\.conv\.conv\.weight", ("decoder", "out", "kernel"), _conv),
      (r"out\.conv\.conv\.bias", ("decoder", "out", "bias"), lambda b: b),
  ]
  for key in state_keys:
    for pattern, path, fn in rules:
      match = re.fullmatch(pattern, key)
      if match:
        groups = match.groups()
        m1 = int(groups[0]) - 1 if groups and pattern.startswith("decoder") else None
        m.append(entry(key, tuple(p.format(*groups, m1=m1) for p in path), fn))
        break
  return m


def convert_unetr(state_dict, model: unetr.Unetr, in_channels: int) -> dict:
  """A MONAI UNETR state dict (torch tensors or numpy) -> params of ``model`` (raises one
  ValueError listing every unused / missing / mis-shaped tensor)."""
  state = torch_io.as_numpy_state_dict(state_dict)
  state = {k: v for k, v in state.items() if "norm_cross_attn" not in k}   # unused (no cross-attention)
  enc = model.encoder
  size = enc.volume_size
  expected = torch_io.flat_shapes(lambda: nn.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *size, in_channels)))["params"]))
  flat = torch_io.convert_with_mapping(state, mapping(enc.size.num_heads, enc.qkv_bias, state),
                                       expected, _WHAT)
  return torch_io.to_param_tree(flat, scan=False)


def load_monai_unetr(state_dict, in_channels: int, num_classes: int, img_size, **kwargs):
  """(our model, params) for a MONAI ``UNETR(in_channels, num_classes, img_size, **kwargs)``."""
  model = build_unetr(num_classes, tuple(img_size), **kwargs)
  return model, convert_unetr(state_dict, model, in_channels)
