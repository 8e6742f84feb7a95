"""SAM / MedSAM weights in and out: Hugging Face ``SamModel`` and the original ``segment_anything``
state-dict layout (Meta's SAM releases, MedSAM's ``medsam_vit_b.pth``).

- :func:`load` ``(source, ...) -> (module, params, config_overrides)``: ``source`` is an HF model
  directory, a ``*.safetensors`` / ``*.bin`` / ``*.pth`` file, a state dict, or a torch module
  (``SamModel`` or ``segment_anything``'s ``Sam``). The layout is detected from the tensor names;
  ``config_overrides`` are the :data:`medfm_jax.models.sam.DEFAULTS` fields of the checkpoint.
- :func:`export` ``(params, config, out_dir, format=)`` writes ``config.json`` + ``model.safetensors``
  (``SamModel.from_pretrained`` loads it) or ``sam.pth`` (``segment_anything``'s ``build_sam_*``
  ``checkpoint=`` / ``Sam.load_state_dict`` loads it).

A ``segment_anything`` state dict has no config: sizes are read from tensor shapes (heads from the
relative position tables, window size and global blocks from their lengths); the mask decoder's
head count is not in the shapes and defaults to SAM's 8 (``decoder_heads=`` overrides it).
Layouts: torch Linear ``(out, in)`` -> kernel ``(in, out)``; fused ``qkv`` -> per-head q/k/v
``[embed, heads, head_dim]``; Conv2d ``(out, in, kh, kw)`` -> HWIO; ConvTranspose2d
``(in, out, kh, kw)`` -> ``[kh, kw, in, out]``; the patch conv -> PatchEmbed's ``[p*p*c, D]``.
"""
from __future__ import annotations

import functools
import io
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.interop import torch_io
from medfm_jax.interop.torch_io import Entry, entry
from medfm_jax.models import sam as sam_lib

FORMATS = ("hf", "segment_anything")
HF_PE = "shared_image_embedding.positional_embedding"
HF_PE_TIED = "prompt_encoder.shared_embedding.positional_embedding"


# ---------------------------------------------------------------------------------------------
# layout conversions

def _conv(w):            # torch (out, in, kh, kw) -> HWIO
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_to_torch(k):
  return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def _conv_t(w):          # torch ConvTranspose (in, out, kh, kw) <-> [kh, kw, in, out] (an involution)
  return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _split_qkv(heads):
  def to_ours(w):
    return tuple(torch_io.qkv_kernel(x, heads) for x in np.split(w, 3, axis=0))
  return to_ours


def _qkv_to_torch(q, k, v):
  return (np.concatenate([torch_io.qkv_kernel_to_torch(x, 0) for x in (q, k, v)], axis=0),)


def _dense(hf: str, ours: tuple[str, ...]) -> list[Entry]:
  return torch_io.dense_entries(hf, ours)


def _norm(hf: str, ours: tuple[str, ...]) -> list[Entry]:
  return torch_io.norm_entries(hf, ours)


def _attention(hf: str, ours: tuple[str, ...], heads: int, out: str = "out_proj") -> list[Entry]:
  """Separate ``{q,k,v}_proj`` / ``out_proj`` Linear layers <-> :class:`SamAttention`."""
  m = []
  for hf_name, our in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    m += [entry(f"{hf}.{hf_name}.weight", (*ours, our, "kernel"), lambda w: torch_io.qkv_kernel(w, heads),
                lambda k: torch_io.qkv_kernel_to_torch(k, heads)),
          entry(f"{hf}.{hf_name}.bias", (*ours, our, "bias"), lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1))]
  return m + [entry(f"{hf}.{out}.weight", (*ours, "out", "kernel"), lambda w: torch_io.out_kernel(w, heads),
                    lambda k: torch_io.out_kernel_to_torch(k, heads)),
              entry(f"{hf}.{out}.bias", (*ours, "out", "bias"))]


def _fused_attention(hf: str, ours: tuple[str, ...], heads: int, use_rel_pos: bool) -> list[Entry]:
  """The image encoder's fused ``qkv`` + ``proj`` (+ ``rel_pos_h/w``) <-> :class:`RelPosAttention`."""
  paths = tuple((*ours, n, "kernel") for n in ("query", "key", "value"))
  bias_paths = tuple((*ours, n, "bias") for n in ("query", "key", "value"))
  m = [Entry((f"{hf}.qkv.weight",), paths, _split_qkv(heads), _qkv_to_torch),
       Entry((f"{hf}.qkv.bias",), bias_paths, lambda b: tuple(x.reshape(heads, -1) for x in np.split(b, 3)),
             lambda q, k, v: (np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)]),)),
       entry(f"{hf}.proj.weight", (*ours, "out", "kernel"), lambda w: torch_io.out_kernel(w, heads),
             lambda k: torch_io.out_kernel_to_torch(k, heads)),
       entry(f"{hf}.proj.bias", (*ours, "out", "bias"))]
  if use_rel_pos:
    m += [entry(f"{hf}.rel_pos_h", (*ours, "rel_pos_h")), entry(f"{hf}.rel_pos_w", (*ours, "rel_pos_w"))]
  return m


def _mlp_head(hf: str, ours: tuple[str, ...], depth: int, fmt: str) -> list[Entry]:
  """SAM's ``MLP`` (``layers.i``) / HF's ``SamFeedForward`` (``proj_in``, ``layers.i``, ``proj_out``)."""
  if fmt == "segment_anything":
    names = [f"{hf}.layers.{i}" for i in range(depth)]
  else:
    names = [f"{hf}.proj_in"] + [f"{hf}.layers.{i}" for i in range(depth - 2)] + [f"{hf}.proj_out"]
  return [e for i, n in enumerate(names) for e in _dense(n, (*ours, f"layer_{i}"))]


# ---------------------------------------------------------------------------------------------
# name mapping per format

_NAMES = {
    "segment_anything": dict(
        enc="image_encoder", patch="image_encoder.patch_embed.proj", block="image_encoder.blocks",
        ln1="norm1", ln2="norm2", neck=("neck.0", "neck.1", "neck.2", "neck.3"),
        pe="prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        point="prompt_encoder.point_embeddings.{i}.weight",
        mask=("mask_downscaling.0", "mask_downscaling.1", "mask_downscaling.3", "mask_downscaling.4",
              "mask_downscaling.6"),
        dec_norms=("norm1", "norm2", "norm3", "norm4"), final_norm="norm_final_attn",
        upscale=("output_upscaling.0", "output_upscaling.1", "output_upscaling.3")),
    "hf": dict(
        enc="vision_encoder", patch="vision_encoder.patch_embed.projection", block="vision_encoder.layers",
        ln1="layer_norm1", ln2="layer_norm2", neck=("neck.conv1", "neck.layer_norm1", "neck.conv2", "neck.layer_norm2"),
        pe=HF_PE, point="prompt_encoder.point_embed.{i}.weight",
        mask=("mask_embed.conv1", "mask_embed.layer_norm1", "mask_embed.conv2", "mask_embed.layer_norm2",
              "mask_embed.conv3"),
        dec_norms=("layer_norm1", "layer_norm2", "layer_norm3", "layer_norm4"), final_norm="layer_norm_final_attn",
        upscale=("upscale_conv1", "upscale_layer_norm", "upscale_conv2")),
}


def _mapping(cfg: dict[str, Any], fmt: str) -> list[Entry]:
  n = _NAMES[fmt]
  e_ = ("image_encoder",)
  p, c = cfg["patch_size"], cfg["channels"]
  m = [entry(f"{n['patch']}.weight", (*e_, "patch_embed", "proj", "kernel"), torch_io.patch_kernel,
             functools.partial(torch_io.patch_kernel_to_torch, patch=p, channels=c)),
       entry(f"{n['patch']}.bias", (*e_, "patch_embed", "proj", "bias"))]
  if cfg["use_abs_pos"]:
    m.append(entry(f"{n['enc']}.pos_embed", (*e_, "pos_embed")))
  for i in range(cfg["depth"]):
    hf, ours = f"{n['block']}.{i}", (*e_, f"layer_{i}")
    m += (_norm(f"{hf}.{n['ln1']}", (*ours, "norm1")) + _norm(f"{hf}.{n['ln2']}", (*ours, "norm2"))
          + _fused_attention(f"{hf}.attn", (*ours, "attn"), cfg["num_heads"], cfg["use_rel_pos"])
          + _dense(f"{hf}.mlp.lin1", (*ours, "mlp", "fc1")) + _dense(f"{hf}.mlp.lin2", (*ours, "mlp", "fc2")))
  c1, l1, c2, l2 = (f"{n['enc']}.{x}" for x in n["neck"])
  m += [entry(f"{c1}.weight", (*e_, "neck", "conv1", "kernel"), _conv, _conv_to_torch),
        entry(f"{c2}.weight", (*e_, "neck", "conv2", "kernel"), _conv, _conv_to_torch)]
  m += _norm(l1, (*e_, "neck", "ln1")) + _norm(l2, (*e_, "neck", "ln2"))
  # prompt encoder
  pe_ = ("prompt_encoder",)
  m.append(entry(n["pe"], (*pe_, "pe_gaussian")))
  points = tuple(n["point"].format(i=i) for i in range(4))
  m.append(Entry(points, ((*pe_, "point_embeddings"),), lambda *ws: (np.concatenate(ws, axis=0),),
                 lambda w: tuple(w[i:i + 1] for i in range(4))))
  m += [entry("prompt_encoder.not_a_point_embed.weight", (*pe_, "not_a_point_embed")),
        entry("prompt_encoder.no_mask_embed.weight", (*pe_, "no_mask_embed"))]
  mc1, ml1, mc2, ml2, mc3 = (f"prompt_encoder.{x}" for x in n["mask"])
  for hf, ours in ((mc1, "mask_conv1"), (mc2, "mask_conv2"), (mc3, "mask_conv3")):
    m += [entry(f"{hf}.weight", (*pe_, ours, "kernel"), _conv, _conv_to_torch),
          entry(f"{hf}.bias", (*pe_, ours, "bias"))]
  m += _norm(ml1, (*pe_, "mask_ln1")) + _norm(ml2, (*pe_, "mask_ln2"))
  # mask decoder
  d_, heads = ("mask_decoder",), cfg["decoder_heads"]
  m += [entry("mask_decoder.iou_token.weight", (*d_, "iou_token")),
        entry("mask_decoder.mask_tokens.weight", (*d_, "mask_tokens"))]
  t = "mask_decoder.transformer"
  for i in range(cfg["decoder_depth"]):
    hf, ours = f"{t}.layers.{i}", (*d_, "transformer", f"layer_{i}")
    for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
      m += _attention(f"{hf}.{a}", (*ours, a), heads)
    for hn, on in zip(n["dec_norms"], ("norm1", "norm2", "norm3", "norm4")):
      m += _norm(f"{hf}.{hn}", (*ours, on))
    m += _dense(f"{hf}.mlp.lin1", (*ours, "mlp", "fc1")) + _dense(f"{hf}.mlp.lin2", (*ours, "mlp", "fc2"))
  m += _attention(f"{t}.final_attn_token_to_image", (*d_, "transformer", "final_attn_token_to_image"), heads)
  m += _norm(f"{t}.{n['final_norm']}", (*d_, "transformer", "norm_final"))
  u1, un, u2 = (f"mask_decoder.{x}" for x in n["upscale"])
  for hf, ours in ((u1, "upscale_conv1"), (u2, "upscale_conv2")):
    m += [entry(f"{hf}.weight", (*d_, ours, "kernel"), _conv_t, _conv_t), entry(f"{hf}.bias", (*d_, ours, "bias"))]
  m += _norm(un, (*d_, "upscale_norm"))
  for i in range(cfg["num_multimask_outputs"] + 1):
    m += _mlp_head(f"mask_decoder.output_hypernetworks_mlps.{i}", (*d_, f"hyper_{i}"), 3, fmt)
  m += _mlp_head("mask_decoder.iou_prediction_head", (*d_, "iou_head"), cfg["iou_head_depth"], fmt)
  return m


# ---------------------------------------------------------------------------------------------
# configs

def detect_format(state_dict: dict[str, Any]) -> str:
  """'hf' (``vision_encoder.*``) or 'segment_anything' (``image_encoder.*``); one-line error otherwise."""
  if any(k.startswith("vision_encoder.") for k in state_dict):
    return "hf"
  if any(k.startswith("image_encoder.") for k in state_dict):
    return "segment_anything"
  raise ValueError("not a SAM state dict: no tensor named vision_encoder.* (HF SamModel) or image_encoder.* "
                   "(segment_anything)")


def config_from_hf(hf_config) -> dict[str, Any]:
  """Our SAM fields (:data:`medfm_jax.models.sam.DEFAULTS`) from an HF ``SamConfig`` / dict / config.json."""
  raw = torch_io.read_hf_config(hf_config, "HF SamModel")
  v, pr, d = (raw.get(k) or {} for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config"))
  get = lambda sub, k, default: sub.get(k, default) if sub.get(k) is not None else default
  width = int(get(v, "hidden_size", 768))
  cfg = dict(
      image_size=torch_io.square(get(v, "image_size", 1024), "image_size", "HF SamModel"),
      patch_size=torch_io.square(get(v, "patch_size", 16), "patch_size", "HF SamModel"),
      channels=int(get(v, "num_channels", 3)), width=width, depth=int(get(v, "num_hidden_layers", 12)),
      num_heads=int(get(v, "num_attention_heads", 12)),
      mlp_dim=int(get(v, "mlp_dim", int(width * float(get(v, "mlp_ratio", 4.0))))),
      window_size=int(get(v, "window_size", 14)), global_attn_indexes=tuple(get(v, "global_attn_indexes", (2, 5, 8, 11))),
      use_abs_pos=bool(get(v, "use_abs_pos", True)), use_rel_pos=bool(get(v, "use_rel_pos", True)),
      qkv_bias=bool(get(v, "qkv_bias", True)), layer_norm_eps=float(get(v, "layer_norm_eps", 1e-6)),
      prompt_dim=int(get(pr, "hidden_size", 256)), mask_in_chans=int(get(pr, "mask_input_channels", 16)),
      decoder_depth=int(get(d, "num_hidden_layers", 2)), decoder_heads=int(get(d, "num_attention_heads", 8)),
      decoder_mlp_dim=int(get(d, "mlp_dim", 2048)), attention_downsample_rate=int(get(d, "attention_downsample_rate", 2)),
      num_multimask_outputs=int(get(d, "num_multimask_outputs", 3)), iou_head_depth=int(get(d, "iou_head_depth", 3)),
      iou_head_hidden_dim=int(get(d, "iou_head_hidden_dim", 256)),
      decoder_layer_norm_eps=float(get(d, "layer_norm_eps", 1e-6)))
  problems = []
  acts = (get(v, "hidden_act", "gelu"), get(pr, "hidden_act", "gelu"), get(d, "hidden_act", "relu"))
  if acts != ("gelu", "gelu", "relu"):
    problems.append(f"activations (vision, prompt, decoder)={acts} (only ('gelu', 'gelu', 'relu'))")
  if int(get(v, "output_channels", 256)) != cfg["prompt_dim"]:
    problems.append(f"vision output_channels={get(v, 'output_channels', 256)} != prompt hidden_size={cfg['prompt_dim']}")
  if int(get(v, "num_pos_feats", 128)) * 2 != cfg["prompt_dim"]:
    problems.append(f"num_pos_feats={get(v, 'num_pos_feats', 128)} is not prompt hidden_size / 2")
  if int(get(d, "hidden_size", 256)) != cfg["prompt_dim"]:
    problems.append(f"mask decoder hidden_size={get(d, 'hidden_size', 256)} != prompt hidden_size")
  pr_grid = (torch_io.square(get(pr, "image_size", 1024), "image_size", "HF SamModel")
             // torch_io.square(get(pr, "patch_size", 16), "patch_size", "HF SamModel"))
  if pr_grid != cfg["image_size"] // cfg["patch_size"]:
    problems.append(f"prompt-encoder grid {pr_grid} != vision grid {cfg['image_size'] // cfg['patch_size']}")
  if problems:
    raise ValueError("unsupported HF SamModel config: " + "; ".join(problems))
  return cfg


def hf_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
  """The ``SamConfig`` dict of our SAM fields (inverse of :func:`config_from_hf`)."""
  cfg = sam_lib.full_config(cfg)
  c = cfg["prompt_dim"]
  vision = dict(hidden_size=cfg["width"], output_channels=c, num_hidden_layers=cfg["depth"],
                num_attention_heads=cfg["num_heads"], num_channels=cfg["channels"], image_size=cfg["image_size"],
                patch_size=cfg["patch_size"], hidden_act="gelu", layer_norm_eps=cfg["layer_norm_eps"],
                qkv_bias=cfg["qkv_bias"], mlp_ratio=cfg["mlp_dim"] / cfg["width"], mlp_dim=cfg["mlp_dim"],
                use_abs_pos=cfg["use_abs_pos"], use_rel_pos=cfg["use_rel_pos"], window_size=cfg["window_size"],
                global_attn_indexes=list(cfg["global_attn_indexes"]), num_pos_feats=c // 2)
  prompt = dict(hidden_size=c, image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                mask_input_channels=cfg["mask_in_chans"], num_point_embeddings=4, hidden_act="gelu",
                layer_norm_eps=1e-6)
  decoder = dict(hidden_size=c, hidden_act="relu", mlp_dim=cfg["decoder_mlp_dim"], num_hidden_layers=cfg["decoder_depth"],
                 num_attention_heads=cfg["decoder_heads"], attention_downsample_rate=cfg["attention_downsample_rate"],
                 num_multimask_outputs=cfg["num_multimask_outputs"], iou_head_depth=cfg["iou_head_depth"],
                 iou_head_hidden_dim=cfg["iou_head_hidden_dim"], layer_norm_eps=cfg["decoder_layer_norm_eps"])
  return dict(model_type="sam", architectures=["SamModel"], vision_config=vision, prompt_encoder_config=prompt,
              mask_decoder_config=decoder)


def _count(sd, pattern: str) -> int:
  ids = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
  return max(ids) + 1 if ids else 0


def config_from_segment_anything(sd: dict[str, np.ndarray], **overrides) -> dict[str, Any]:
  """Our SAM fields read from a ``segment_anything`` state dict's shapes (see the module docstring)."""
  def shape(name):
    if name not in sd:
      raise ValueError(f"segment_anything state dict lacks {name!r}")
    return sd[name].shape
  width, channels, patch, _ = shape("image_encoder.patch_embed.proj.weight")
  depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
  use_abs = "image_encoder.pos_embed" in sd
  use_rel = "image_encoder.blocks.0.attn.rel_pos_h" in sd
  grid = shape("image_encoder.pos_embed")[1] if use_abs else None
  cfg = dict(patch_size=int(patch), channels=int(channels), width=int(width), depth=depth,
             mlp_dim=int(shape("image_encoder.blocks.0.mlp.lin1.weight")[0]), use_abs_pos=use_abs, use_rel_pos=use_rel,
             qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
             prompt_dim=int(shape("prompt_encoder.no_mask_embed.weight")[1]),
             mask_in_chans=int(shape("prompt_encoder.mask_downscaling.3.weight")[0]),
             decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
             decoder_mlp_dim=int(shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0]),
             attention_downsample_rate=int(shape("mask_decoder.transformer.layers.0.self_attn.q_proj.weight")[0]
                                           // shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]),
             num_multimask_outputs=int(shape("mask_decoder.mask_tokens.weight")[0]) - 1,
             iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
             iou_head_hidden_dim=int(shape("mask_decoder.iou_prediction_head.layers.0.weight")[0]),
             decoder_layer_norm_eps=1e-5, layer_norm_eps=1e-6)
  if use_rel:
    cfg["num_heads"] = int(width) // int(shape("image_encoder.blocks.0.attn.rel_pos_h")[1])
    lengths = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    grid = grid or (max(lengths) + 1) // 2
    cfg["global_attn_indexes"] = tuple(i for i, n in enumerate(lengths) if n == 2 * grid - 1)
    windows = {(n + 1) // 2 for n in lengths if n != 2 * grid - 1}
    cfg["window_size"] = windows.pop() if len(windows) == 1 else 0
  else:
    cfg["num_heads"] = next((s[2] for s in sam_lib.SAM_SIZES.values() if s[0] == width), 12)
  if grid:
    cfg["image_size"] = int(grid) * int(patch)
  return sam_lib.full_config(cfg, **overrides)


# ---------------------------------------------------------------------------------------------
# convert / export

@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(items: tuple) -> dict[tuple[str, ...], tuple[int, ...]]:
  cfg = dict(items)
  model = sam_lib.build_sam(cfg)
  s = cfg["image_size"]
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, s, s, cfg["channels"])), jnp.zeros((1, 1, 1, 2)),
      jnp.ones((1, 1, 1), jnp.int32))["params"]))


def _expected_shapes(cfg):
  return _expected_shapes_cached(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items())))


def convert(state_dict: dict[str, Any], cfg: dict[str, Any], fmt: str | None = None) -> dict:
  """A SAM state dict (either layout) -> our :class:`SegmentAnything` params (numpy float32)."""
  sd = torch_io.as_numpy_state_dict(state_dict)
  fmt = fmt or detect_format(sd)
  if fmt not in FORMATS:
    raise ValueError(f"SAM format={fmt!r}: allowed {FORMATS}")
  cfg = sam_lib.full_config(cfg)
  consumed, bad = (), ()
  if fmt == "hf" and HF_PE_TIED in sd:
    consumed = (HF_PE_TIED,)
    if HF_PE in sd and not np.array_equal(sd[HF_PE], sd[HF_PE_TIED]):
      bad = (f"{HF_PE_TIED} differs from its tied copy {HF_PE}",)
    sd = {HF_PE: sd[HF_PE_TIED], **sd}
  flat = torch_io.convert_with_mapping(sd, _mapping(cfg, fmt), _expected_shapes(cfg), f"SAM ({fmt}) import",
                                       consumed, bad)
  return torch_io.to_param_tree(flat, scan=False)


def export_state_dict(params: dict, cfg: dict[str, Any], fmt: str = "hf") -> dict[str, np.ndarray]:
  """Inverse of :func:`convert`: our params -> a state dict in ``fmt`` ('hf' writes both tied PE copies)."""
  if fmt not in FORMATS:
    raise ValueError(f"SAM format={fmt!r}: allowed {FORMATS}")
  if "encoder" in nn.unbox(params).get("image_encoder", {}):
    raise ValueError("SAM export: the image encoder is one of our ViTs behind a neck (ViTNeckEncoder); "
                     "only SAM's own ViTDet encoder has an HF / segment_anything layout")
  flat = torch_io.from_param_tree(params)
  out = torch_io.export_with_mapping(flat, _mapping(sam_lib.full_config(cfg), fmt), f"SAM ({fmt}) export")
  if fmt == "hf":
    out[HF_PE_TIED] = out[HF_PE]
  return out


def load(source, config=None, format: str | None = None, dtype=jnp.float32,  # pylint: disable=redefined-builtin
         **overrides) -> tuple[sam_lib.SegmentAnything, dict, dict[str, Any]]:
  """``source`` (HF directory, checkpoint file, state dict or torch module) -> ``(module, params,
  config_overrides)``. ``config``: an HF ``SamConfig`` / dict / config.json for HF sources (default:
  the directory's or the torch module's own config); ``overrides``: SAM fields (e.g.
  ``decoder_heads`` for a ``segment_anything`` checkpoint with a non-default decoder)."""
  if config is None and hasattr(source, "config"):
    config = source.config
  if config is None and torch_io.is_path(source) and (torch_io.epath_of(source) / "config.json").is_file():
    config = source
  sd = torch_io.as_numpy_state_dict(source)
  fmt = format or detect_format(sd)
  if fmt not in FORMATS:
    raise ValueError(f"SAM format={fmt!r}: allowed {FORMATS}")
  if fmt == "hf":
    cfg = sam_lib.full_config(config_from_hf(config if config is not None else {}), **overrides)
  else:
    cfg = config_from_segment_anything(sd, **overrides)
  params = convert(sd, cfg, fmt)
  return sam_lib.build_sam(cfg, dtype=dtype), params, cfg


def export(params: dict, config: dict[str, Any], out_dir, format: str = "hf") -> str:  # pylint: disable=redefined-builtin
  """Writes ``out_dir/config.json`` + ``model.safetensors`` ('hf') or ``out_dir/sam.pth``
  ('segment_anything'); returns the weights file's path. ``config``: our SAM fields."""
  sd = export_state_dict(params, config, format)
  if format == "hf":
    torch_io.write_hf(out_dir, sd, hf_config_dict(config))
    return os.fspath(torch_io.epath_of(out_dir) / "model.safetensors")
  import torch  # optional: the 'parity' extra; pylint: disable=import-outside-toplevel
  out = torch_io.epath_of(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, buf)
  (out / "sam.pth").write_bytes(buf.getvalue())
  return os.fspath(out / "sam.pth")
