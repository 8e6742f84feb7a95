"""Hugging Face ``ViTMAEForPreTraining`` <-> ``medfm_jax`` ``MaskedAutoencoder`` weight conversion.

Layouts: torch Linear ``(out, in)`` -> Flax kernel ``(in, out)``; q/k/v -> ``[embed, heads, head_dim]``;
attention output -> ``[heads, head_dim, embed]``; the patch conv ``(D, C, p, p)`` -> the PatchEmbed
kernel ``[p*p*C, D]`` in ``(p, q, c)`` order (:func:`medfm_jax.models.vit.patchify`). HF's fixed
position embeddings are not parameters here (we compute sin-cos); conversion checks that they agree.
Both the current (``vit.layers.N.attention.q_proj``) and the transformers 4.x
(``vit.encoder.layer.N.attention.attention.query``) tensor names are accepted.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medfm_jax.interop.torch_io import load_torch_state_dict
from medfm_jax.models import layers, vit
from medfm_jax.models.mae import MaskedAutoencoder

__all__ = ["load_torch_state_dict", "config_from_hf", "vit_variant", "build_mae",
           "normalize_hf_names", "convert_vitmae", "export_vitmae", "ENCODER_POS_EMBED",
           "DECODER_POS_EMBED"]

ENCODER_POS_EMBED = "vit.embeddings.position_embeddings"
DECODER_POS_EMBED = "decoder.decoder_pos_embed"

# transformers 4.x name -> current name, applied in order (mirrors transformers' conversion_mapping).
_LEGACY_RENAMES = (
    (r"^vit\.encoder\.layer\.", "vit.layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)

_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                    qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75,
                    norm_pix_loss=False)


def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"HF ViTMAE {name}={value!r}: only square sizes are supported")
    value = value[0]
  return int(value)


def _config_dict(hf_config) -> dict[str, Any]:
  if isinstance(hf_config, (str, os.PathLike)):
    path = os.fspath(hf_config)
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
      raise ValueError(f"HF config {path!r} does not exist; expected a config.json or its directory")
    with open(path) as f:
      hf_config = json.load(f)
  if not isinstance(hf_config, dict):
    hf_config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config)
  return {k: hf_config.get(k, v) for k, v in _HF_DEFAULTS.items()} | {"head_dim": hf_config.get("head_dim")}


def config_from_hf(hf_config) -> dict[str, Any]:
  """Our MAE hyperparameters from a ``ViTMAEConfig``, its dict, or a ``config.json`` path / directory."""
  c = _config_dict(hf_config)
  if c["head_dim"] not in (None, c["hidden_size"] // c["num_attention_heads"]):
    raise ValueError(f"HF ViTMAE head_dim={c['head_dim']}: only hidden_size // num_attention_heads is supported")
  return dict(
      width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
      mlp_dim=int(c["intermediate_size"]), patch_size=_square(c["patch_size"], "patch_size"),
      image_size=_square(c["image_size"], "image_size"), channels=int(c["num_channels"]),
      layer_norm_eps=float(c["layer_norm_eps"]), decoder_width=int(c["decoder_hidden_size"]),
      decoder_depth=int(c["decoder_num_hidden_layers"]), decoder_heads=int(c["decoder_num_attention_heads"]),
      decoder_mlp_dim=int(c["decoder_intermediate_size"]), mask_ratio=float(c["mask_ratio"]),
      norm_pix_loss=bool(c["norm_pix_loss"]), hidden_act=c["hidden_act"], qkv_bias=bool(c["qkv_bias"]))


def _as_cfg(hf_config_or_cfg) -> dict[str, Any]:
  if isinstance(hf_config_or_cfg, dict) and "decoder_width" in hf_config_or_cfg:
    return hf_config_or_cfg
  return config_from_hf(hf_config_or_cfg)


def _check_supported(cfg: dict[str, Any]) -> None:
  problems = []
  if cfg["hidden_act"] != "gelu":
    problems.append(f"hidden_act={cfg['hidden_act']!r} (only exact 'gelu')")
  if not cfg["qkv_bias"]:
    problems.append("qkv_bias=False (our ViT always has q/k/v biases)")
  if cfg["image_size"] % cfg["patch_size"]:
    problems.append(f"image_size={cfg['image_size']} not divisible by patch_size={cfg['patch_size']}")
  if problems:
    raise ValueError("unsupported HF ViTMAE config: " + "; ".join(problems))


def vit_variant(hf_config) -> str:
  """The ``"NAME/PATCH"`` variant whose sizes match the HF encoder, else the closest-width name
  (then :func:`build_mae` passes the exact sizes as overrides)."""
  cfg = _as_cfg(hf_config)
  sizes = (cfg["width"], cfg["depth"], cfg["num_heads"], cfg["mlp_dim"])
  for name, entry in vit.VARIANTS.items():
    if tuple(entry) == sizes:
      return f"{name}/{cfg['patch_size']}"
  name = min(vit.VARIANTS, key=lambda n: abs(vit.VARIANTS[n][0] - cfg["width"]))
  return f"{name}/{cfg['patch_size']}"


def build_mae(hf_config, scan: bool = False, **vit_kwargs) -> MaskedAutoencoder:
  """Our ``MaskedAutoencoder`` with the HF model's sizes; ``vit_kwargs`` go to ``VisionTransformer``."""
  cfg = _as_cfg(hf_config)
  _check_supported(cfg)
  encoder = vit.VisionTransformer(variant=vit_variant(cfg), image_size=cfg["image_size"],
                                  pos_embed="sincos2d", layer_norm_eps=cfg["layer_norm_eps"],
                                  activation="gelu", final_norm=True, scan=scan,
                                  qkv_bias=cfg["qkv_bias"], width=cfg["width"], depth=cfg["depth"],
                                  num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"], **vit_kwargs)
  return MaskedAutoencoder(encoder, cfg["decoder_width"], cfg["decoder_depth"], cfg["decoder_heads"],
                           cfg["decoder_mlp_dim"])


def normalize_hf_names(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Renames transformers 4.x ViTMAE tensor names to the current ones (others pass through)."""
  out = {}
  for name, value in state_dict.items():
    new = name
    for pattern, repl in _LEGACY_RENAMES:
      new = re.sub(pattern, repl, new)
    if new in out:
      raise ValueError(f"state dict holds both {name!r} and a tensor that is also named {new!r}")
    out[new] = value
  return out


# ---------------------------------------------------------------------------------------------
# name/layout mapping: (hf name, our path, hf -> ours, ours -> hf)

def _t(x):
  return np.ascontiguousarray(x.T)


def _qkv_w(w, h):
  return w.T.reshape(w.shape[1], h, -1)


def _qkv_w_inv(k, h):
  return _t(k.reshape(k.shape[0], -1))


def _out_w(w, h):
  return w.T.reshape(h, -1, w.shape[0])


def _out_w_inv(k, h):
  return _t(k.reshape(-1, k.shape[-1]))


def _patch_w(w):
  d, c, p, q = w.shape
  return w.transpose(2, 3, 1, 0).reshape(p * q * c, d)


def _patch_w_inv(k, p, c):
  return np.ascontiguousarray(k.reshape(p, p, c, -1).transpose(3, 2, 0, 1))


def _ident(x):
  return x


def _mapping(cfg: dict[str, Any]) -> list[tuple[str, tuple[str, ...], Callable, Callable]]:
  dense = lambda hf, ours: [(f"{hf}.weight", (*ours, "kernel"), _t, _t),
                            (f"{hf}.bias", (*ours, "bias"), _ident, _ident)]
  norm = lambda hf, ours: [(f"{hf}.weight", (*ours, "scale"), _ident, _ident),
                           (f"{hf}.bias", (*ours, "bias"), _ident, _ident)]

  def block(hf, ours, heads):
    qw, qwi = functools.partial(_qkv_w, h=heads), functools.partial(_qkv_w_inv, h=heads)
    qb, qbi = lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1)
    m = []
    for hf_name, our_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      m += [(f"{hf}.attention.{hf_name}.weight", (*ours, "attn", our_name, "kernel"), qw, qwi),
            (f"{hf}.attention.{hf_name}.bias", (*ours, "attn", our_name, "bias"), qb, qbi)]
    m += [(f"{hf}.attention.o_proj.weight", (*ours, "attn", "out", "kernel"),
           functools.partial(_out_w, h=heads), functools.partial(_out_w_inv, h=heads)),
          (f"{hf}.attention.o_proj.bias", (*ours, "attn", "out", "bias"), _ident, _ident)]
    m += norm(f"{hf}.layernorm_before", (*ours, "norm1")) + norm(f"{hf}.layernorm_after", (*ours, "norm2"))
    m += dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2"))
    return m

  p, c = cfg["patch_size"], cfg["channels"]
  m = [("vit.embeddings.cls_token", ("encoder", "cls_token"), _ident, _ident),
       ("vit.embeddings.patch_embeddings.projection.weight", ("encoder", "patch_embed", "proj", "kernel"),
        _patch_w, functools.partial(_patch_w_inv, p=p, c=c)),
       ("vit.embeddings.patch_embeddings.projection.bias", ("encoder", "patch_embed", "proj", "bias"),
        _ident, _ident)]
  for i in range(cfg["depth"]):
    m += block(f"vit.layers.{i}", ("encoder", "encoder", f"layer_{i}"), cfg["num_heads"])
  m += norm("vit.layernorm", ("encoder", "norm"))
  m += [("decoder.mask_token", ("decoder", "mask_token"), _ident, _ident)]
  m += dense("decoder.decoder_embed", ("decoder", "embed"))
  for i in range(cfg["decoder_depth"]):
    m += block(f"decoder.decoder_layers.{i}", ("decoder", "encoder", f"layer_{i}"), cfg["decoder_heads"])
  m += norm("decoder.decoder_norm", ("decoder", "norm"))
  m += dense("decoder.decoder_pred", ("decoder", "pred"))
  return m


def _pos_embeds(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
  grid = cfg["image_size"] // cfg["patch_size"]
  return {ENCODER_POS_EMBED: layers.sincos_2d(cfg["width"], grid, grid, cls_token=True)[None],
          DECODER_POS_EMBED: layers.sincos_2d(cfg["decoder_width"], grid, grid, cls_token=True)[None]}


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(items: tuple) -> dict[tuple[str, ...], tuple[int, ...]]:
  cfg = dict(items)
  model = build_mae(cfg)
  s, c = cfg["image_size"], cfg["channels"]
  length = (s // cfg["patch_size"]) ** 2
  init = lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1, length)),
                                     cfg["mask_ratio"])["params"])
  tree = jax.eval_shape(init)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _expected_shapes(cfg):
  """Shapes of our (unrolled) param tree, from ``eval_shape`` of the real model (no compute)."""
  return _expected_shapes_cached(tuple(sorted(cfg.items())))


def _fmt(names, limit=20) -> str:
  names = sorted("/".join(n) if isinstance(n, tuple) else n for n in names)
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _stack(params: dict) -> dict:
  with jax.default_device(jax.devices("cpu")[0]):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), vit.stack_layers(params))


def convert_vitmae(state_dict: dict[str, Any], hf_config, scan: bool = False,
                   check_pos_embed: bool = True, pos_embed_atol: float = 1e-5) -> dict:
  """HF ``ViTMAEForPreTraining`` state dict -> our ``MaskedAutoencoder`` params (numpy float32).

  The tree equals ``nn.unbox(build_mae(hf_config, scan).init(...)['params'])`` in structure and shapes.
  Raises ValueError listing unused HF tensors, unfilled params and shape mismatches; with
  ``check_pos_embed`` also when HF's fixed position embeddings differ from our sin-cos ones.
  """
  cfg = _as_cfg(hf_config)
  _check_supported(cfg)
  sd = normalize_hf_names(state_dict)
  flat, used, missing_hf, bad = {}, set(), [], []
  for hf_name, path, to_ours, _ in _mapping(cfg):
    if hf_name not in sd:
      missing_hf.append(hf_name)
      continue
    used.add(hf_name)
    x = np.asarray(sd[hf_name], np.float32)
    try:
      flat[path] = np.asarray(to_ours(x), np.float32)
    except ValueError:
      bad.append(f"{hf_name} {x.shape} -> {'/'.join(path)}")
  for name, ref in _pos_embeds(cfg).items():
    if name not in sd:
      continue  # fixed buffers: nothing to load
    used.add(name)
    x = np.asarray(sd[name], np.float32)
    if x.shape != ref.shape:
      bad.append(f"{name} {x.shape} (expected {ref.shape})")
    elif check_pos_embed and not np.allclose(x, ref, rtol=0, atol=pos_embed_atol):
      bad.append(f"{name} differs from our fixed 2-D sin-cos embedding "
                 f"(max abs diff {np.abs(x - ref).max():.3g}; pass check_pos_embed=False to ignore)")
  expected = _expected_shapes(cfg)
  bad += [f"{'/'.join(k)} {flat[k].shape} (expected {v})" for k, v in expected.items()
          if k in flat and flat[k].shape != v]
  problems = []
  if unused := set(sd) - used:
    problems.append(f"unused HF tensors: {_fmt(unused)}")
  if missing_hf:
    problems.append(f"missing HF tensors: {_fmt(missing_hf)}")
  if unfilled := set(expected) - set(flat):
    problems.append(f"unfilled params: {_fmt(unfilled)}")
  if extra := set(flat) - set(expected):
    problems.append(f"params our model does not have: {_fmt(extra)}")
  if bad:
    problems.append(f"shape/value mismatches: {_fmt(bad)}")
  if problems:
    raise ValueError("convert_vitmae: " + "; ".join(problems))
  params = traverse_util.unflatten_dict(flat)
  return _stack(params) if scan else params


def export_vitmae(params: dict, hf_config, include_pos_embed: bool = True) -> dict[str, np.ndarray]:
  """Inverse of :func:`convert_vitmae`: our params (unrolled or scanned) -> HF state dict (numpy)."""
  cfg = _as_cfg(hf_config)
  _check_supported(cfg)
  flat = traverse_util.flatten_dict(vit.unstack_layers(nn.unbox(params)))
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  out, used, missing = {}, set(), []
  for hf_name, path, _, to_hf in _mapping(cfg):
    if path not in flat:
      missing.append(path)
      continue
    used.add(path)
    out[hf_name] = np.ascontiguousarray(to_hf(flat[path]), np.float32)
  unused = set(flat) - used
  if missing or unused:
    raise ValueError(f"export_vitmae: missing params: {_fmt(missing) or '-'}; "
                     f"params with no HF name: {_fmt(unused) or '-'}")
  if include_pos_embed:
    out.update(_pos_embeds(cfg))
  return out
