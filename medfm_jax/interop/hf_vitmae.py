"""Hugging Face ``ViTMAEForPreTraining`` <-> ``medfm_jax`` ``MaskedAutoencoder`` weight conversion.

``load(source)`` -> ``(module, params, config_overrides)`` (an HF directory, weights file, state
dict or torch module); ``export(params, config, out_dir)`` writes what
``ViTMAEForPreTraining.from_pretrained`` loads (``config``: what ``load`` took, or an MAE run config).

Layouts and the mapping machinery are shared with the other importers
(:mod:`medfm_jax.interop.torch_io`). HF's fixed position embeddings are not parameters here (we
compute sin-cos); conversion checks that they agree.
Both the current (``vit.layers.N.attention.q_proj``) and the transformers 4.x
(``vit.encoder.layer.N.attention.attention.query``) tensor names are accepted.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.interop import torch_io
from medfm_jax.interop.torch_io import load_torch_state_dict
from medfm_jax.models import layers, vit
from medfm_jax.models.mae import MaskedAutoencoder

__all__ = ["load", "export", "config_overrides", "hf_config_dict", "cfg_from_run", "load_torch_state_dict", "config_from_hf", "vit_variant", "build_mae",
           "normalize_hf_names", "convert_vitmae", "export_vitmae", "ENCODER_POS_EMBED",
           "DECODER_POS_EMBED"]

ENCODER_POS_EMBED = "vit.embeddings.position_embeddings"
DECODER_POS_EMBED = "decoder.decoder_pos_embed"

# transformers 4.x name -> current name, applied in order (mirrors transformers' conversion_mapping).
_LEGACY_RENAMES = (
    (r"^vit\.encoder\.layer\.", "vit.layers."),
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),   # transformers 5 save_pretrained
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)

_WHAT = "HF ViTMAE"
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                    qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75,
                    norm_pix_loss=False)


def _config_dict(hf_config) -> dict[str, Any]:
  raw = torch_io.read_hf_config(hf_config, "HF ViTMAE")
  return {k: raw.get(k, v) for k, v in _HF_DEFAULTS.items()} | {"head_dim": raw.get("head_dim")}


def config_from_hf(hf_config) -> dict[str, Any]:
  """Our MAE hyperparameters from a ``ViTMAEConfig``, its dict, or a ``config.json`` path / directory."""
  c = _config_dict(hf_config)
  if c["head_dim"] not in (None, c["hidden_size"] // c["num_attention_heads"]):
    raise ValueError(f"HF ViTMAE head_dim={c['head_dim']}: only hidden_size // num_attention_heads is supported")
  return dict(
      width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
      mlp_dim=int(c["intermediate_size"]), patch_size=torch_io.square(c["patch_size"], "patch_size", "HF ViTMAE"),
      image_size=torch_io.square(c["image_size"], "image_size", "HF ViTMAE"), channels=int(c["num_channels"]),
      layer_norm_eps=float(c["layer_norm_eps"]), decoder_width=int(c["decoder_hidden_size"]),
      decoder_depth=int(c["decoder_num_hidden_layers"]), decoder_heads=int(c["decoder_num_attention_heads"]),
      decoder_mlp_dim=int(c["decoder_intermediate_size"]), mask_ratio=float(c["mask_ratio"]),
      norm_pix_loss=bool(c["norm_pix_loss"]), hidden_act=c["hidden_act"], qkv_bias=bool(c["qkv_bias"]))


def cfg_from_run(config) -> dict[str, Any]:
  """Our MAE config of an MAE run config; one ValueError line for what ViTMAE cannot express."""
  v = torch_io.run_vit(config, _WHAT, pos_embed=("sincos2d",), layer_scale_init=(0.0,), num_registers=(0,),
                       activation=("gelu",), swiglu=(False,), ln_pre=(False,), class_token=(True,),
                       mask_token=(False,))
  m, o = config.model, config.objective
  return {k: v[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
                            "layer_norm_eps")} | dict(
      decoder_width=int(m.decoder_width), decoder_depth=int(m.decoder_depth),
      decoder_heads=int(m.decoder_heads), decoder_mlp_dim=4 * int(m.decoder_width),
      mask_ratio=float(o.mask_ratio), norm_pix_loss=bool(o.norm_pix_loss), hidden_act="gelu", qkv_bias=True)


def _as_cfg(config) -> dict[str, Any]:
  """Our MAE config from itself, an HF config (object, dict, path) or an MAE run config."""
  return torch_io.as_family_cfg(config, "decoder_width", cfg_from_run, config_from_hf)


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
  return torch_io.variant_name(cfg["width"], cfg["depth"], cfg["num_heads"], cfg["mlp_dim"], cfg["patch_size"])


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
# name/layout mapping (torch_io.Entry list)

def _mapping(cfg: dict[str, Any]) -> list[torch_io.Entry]:
  dense, norm = torch_io.dense_entries, torch_io.norm_entries

  def block(hf, ours, heads):
    return (torch_io.attention_entries(f"{hf}.attention", (*ours, "attn"), heads)
            + norm(f"{hf}.layernorm_before", (*ours, "norm1")) + norm(f"{hf}.layernorm_after", (*ours, "norm2"))
            + dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2")))

  p, c = cfg["patch_size"], cfg["channels"]
  m = [torch_io.entry("vit.embeddings.cls_token", ("encoder", "cls_token")),
       torch_io.entry("vit.embeddings.patch_embeddings.projection.weight",
                      ("encoder", "patch_embed", "proj", "kernel"), torch_io.patch_kernel,
                      functools.partial(torch_io.patch_kernel_to_torch, patch=p, channels=c)),
       torch_io.entry("vit.embeddings.patch_embeddings.projection.bias", ("encoder", "patch_embed", "proj", "bias"))]
  for i in range(cfg["depth"]):
    m += block(f"vit.layers.{i}", ("encoder", "encoder", f"layer_{i}"), cfg["num_heads"])
  m += norm("vit.layernorm", ("encoder", "norm"))
  m += [torch_io.entry("decoder.mask_token", ("decoder", "mask_token"))]
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
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1, length)), cfg["mask_ratio"])["params"]))


def _expected_shapes(cfg):
  """Shapes of our (unrolled) param tree, from ``eval_shape`` of the real model (no compute)."""
  return _expected_shapes_cached(tuple(sorted(cfg.items())))


def convert_vitmae(state_dict: dict[str, Any], hf_config, scan: bool = False,
                   check_pos_embed: bool = True, pos_embed_atol: float = 1e-5) -> dict:
  """HF ``ViTMAEForPreTraining`` state dict (or module / checkpoint path) -> our ``MaskedAutoencoder``
  params (numpy float32).

  The tree equals ``nn.unbox(build_mae(hf_config, scan).init(...)['params'])`` in structure and shapes.
  Raises ValueError listing unused HF tensors, unfilled params and shape mismatches; with
  ``check_pos_embed`` also when HF's fixed position embeddings differ from our sin-cos ones.
  """
  cfg = _as_cfg(hf_config)
  _check_supported(cfg)
  sd = normalize_hf_names(torch_io.as_numpy_state_dict(state_dict))
  consumed, bad = [], []
  for name, ref in _pos_embeds(cfg).items():
    if name not in sd:
      continue  # fixed buffers: nothing to load
    consumed.append(name)
    x = np.asarray(sd[name], np.float32)
    if x.shape != ref.shape:
      bad.append(f"{name} {x.shape} (expected {ref.shape})")
    elif check_pos_embed and not np.allclose(x, ref, rtol=0, atol=pos_embed_atol):
      bad.append(f"{name} differs from our fixed 2-D sin-cos embedding "
                 f"(max abs diff {np.abs(x - ref).max():.3g}; pass check_pos_embed=False to ignore)")
  flat = torch_io.convert_with_mapping(sd, _mapping(cfg), _expected_shapes(cfg), "convert_vitmae",
                                       tuple(consumed), tuple(bad))
  return torch_io.to_param_tree(flat, scan)


def export_vitmae(params: dict, hf_config, include_pos_embed: bool = True) -> dict[str, np.ndarray]:
  """Inverse of :func:`convert_vitmae`: our params (unrolled or scanned) -> HF state dict (numpy)."""
  cfg = _as_cfg(hf_config)
  _check_supported(cfg)
  out = torch_io.export_with_mapping(torch_io.from_param_tree(params), _mapping(cfg), "export_vitmae")
  if include_pos_embed:
    out.update(_pos_embeds(cfg))
  return out


def config_overrides(hf_config) -> dict[str, Any]:
  """The run-config fields that make ``configs/mae.py`` build this model (RETFound-style continued
  pretraining); one ValueError line for what our MAE config cannot express."""
  cfg = _as_cfg(hf_config)
  _check_supported(cfg)
  if cfg["decoder_mlp_dim"] != 4 * cfg["decoder_width"]:
    raise ValueError(f"{_WHAT} decoder_intermediate_size={cfg['decoder_mlp_dim']}: our MAE config needs "
                     f"4 x decoder_hidden_size = {4 * cfg['decoder_width']}")
  return torch_io.vit_run_fields(
      variant=vit_variant(cfg), width=cfg["width"], depth=cfg["depth"], num_heads=cfg["num_heads"],
      mlp_dim=cfg["mlp_dim"], layer_norm_eps=cfg["layer_norm_eps"], pos_embed="sincos2d", activation="gelu",
      decoder_width=cfg["decoder_width"], decoder_depth=cfg["decoder_depth"],
      decoder_heads=cfg["decoder_heads"]) | {"data.image_size": cfg["image_size"], "data.channels": cfg["channels"]}


def load(source, hf_config=None, scan: bool = False, **vit_kwargs) -> tuple[MaskedAutoencoder, dict, dict]:
  """``(module, params, config_overrides)`` from an HF ``ViTMAEForPreTraining`` directory, weights
  file, state dict (with ``hf_config``) or torch module; ``vit_kwargs`` go to the encoder.
  ``config_overrides`` is None for models our run configs cannot build (a decoder MLP other than 4x)."""
  state_dict, hf_config = torch_io.resolve_source(source, hf_config, _WHAT)
  cfg = _as_cfg(hf_config)
  fields = config_overrides(cfg) if cfg["decoder_mlp_dim"] == 4 * cfg["decoder_width"] else None
  return build_mae(cfg, scan, **vit_kwargs), convert_vitmae(state_dict, cfg, scan), fields


def hf_config_dict(config) -> dict[str, Any]:
  """The HF ``config.json`` (``ViTMAEConfig``) of our MAE config."""
  c = _as_cfg(config)
  return dict(model_type="vit_mae", architectures=["ViTMAEForPreTraining"], hidden_size=c["width"],
              num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"], intermediate_size=c["mlp_dim"],
              hidden_act="gelu", layer_norm_eps=c["layer_norm_eps"], image_size=c["image_size"],
              patch_size=c["patch_size"], num_channels=c["channels"], qkv_bias=True,
              decoder_hidden_size=c["decoder_width"], decoder_num_hidden_layers=c["decoder_depth"],
              decoder_num_attention_heads=c["decoder_heads"], decoder_intermediate_size=c["decoder_mlp_dim"],
              mask_ratio=c["mask_ratio"], norm_pix_loss=c["norm_pix_loss"])


def export(params: dict, config, out_dir) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that ``ViTMAEForPreTraining.from_pretrained``
  loads. ``config``: what :func:`load` took, our MAE config or an MAE run config."""
  cfg = _as_cfg(config)
  return torch_io.write_hf(out_dir, export_vitmae(params, cfg), hf_config_dict(cfg))
