"""Hugging Face ``CLIPModel`` / ``SiglipModel`` -> ``medfm_jax`` :class:`ImageTextModel` weights.

CLIP: ViT with ``ln_pre`` (``pre_layrnorm``), QuickGELU (or the config's activation), class
embedding + its position embedding folded into our ``cls_token`` (the sum is what the model sees),
patch convolution without bias (our patch bias is set to zero), ``post_layernorm`` = our final norm
(applied to every token; the cls row is identical), projections without bias, EOT pooling (first
``eos_token_id``; argmax of the ids for configs with the legacy ``eos_token_id == 2``), causal text
attention. SigLIP: no cls token, attention-pooling head (``head.probe``, packed ``in_proj``), no
image projection, text pooled at the last position with a biased head, bidirectional text attention
without padding mask, ``logit_bias``. The mapping uses :mod:`medfm_jax.interop.torch_io`.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.interop import torch_io
from medfm_jax.models import clip as clip_model
from medfm_jax.models import text, vit

_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}


def config_from_hf(hf_config) -> dict[str, Any]:
  """Our model hyperparameters from a ``CLIPConfig`` / ``SiglipConfig`` (object, dict, or
  ``config.json`` path / directory)."""
  raw = torch_io.read_hf_config(hf_config, "HF CLIP/SigLIP")
  kind = raw.get("model_type", "clip")
  if kind not in ("clip", "siglip"):
    raise ValueError(f"HF config model_type={kind!r}: expected 'clip' or 'siglip'")
  v, t = raw.get("vision_config") or {}, raw.get("text_config") or {}
  for name, c in (("vision_config", v), ("text_config", t)):
    act = c.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
      raise ValueError(f"HF {kind} {name}.hidden_act={act!r}: supported {sorted(_ACTIVATIONS)}")
  eps = 1e-5 if kind == "clip" else 1e-6
  vis = dict(width=int(v.get("hidden_size", 768)), depth=int(v.get("num_hidden_layers", 12)),
             num_heads=int(v.get("num_attention_heads", 12)), mlp_dim=int(v.get("intermediate_size", 3072)),
             patch_size=torch_io.square(v.get("patch_size", 16), "patch_size", f"HF {kind}"),
             image_size=torch_io.square(v.get("image_size", 224), "image_size", f"HF {kind}"),
             channels=int(v.get("num_channels", 3)), layer_norm_eps=float(v.get("layer_norm_eps", eps)),
             activation=_ACTIVATIONS[v.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")])
  eos = int(t.get("eos_token_id", 49407 if kind == "clip" else 1))
  txt = dict(width=int(t.get("hidden_size", 512)), depth=int(t.get("num_hidden_layers", 12)),
             num_heads=int(t.get("num_attention_heads", 8)), mlp_dim=int(t.get("intermediate_size", 2048)),
             context_length=int(t.get("max_position_embeddings", 77 if kind == "clip" else 64)),
             vocab_size=int(t.get("vocab_size", 49408 if kind == "clip" else 32000)),
             layer_norm_eps=float(t.get("layer_norm_eps", eps)),
             activation=_ACTIVATIONS[t.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")],
             eot_id=eos, pad_id=int(t.get("pad_token_id", 1 if kind == "clip" else 1) or 0))
  if kind == "clip":
    txt.update(causal=True, pooling="argmax" if eos == 2 else "eot", mask_padding=True)
    embed_dim = int(raw.get("projection_dim", 512))
  else:
    txt.update(causal=False, pooling="last", mask_padding=False)
    embed_dim = int(t.get("projection_size", txt["width"]))
  return dict(kind=kind, vision=vis, text=txt, embed_dim=embed_dim)


def build_model(hf_config, scan: bool = False) -> clip_model.ImageTextModel:
  """Our ImageTextModel with the HF model's sizes (float32)."""
  cfg = hf_config if isinstance(hf_config, dict) and "kind" in hf_config else config_from_hf(hf_config)
  v, t, clip = cfg["vision"], cfg["text"], cfg["kind"] == "clip"
  image = vit.VisionTransformer(
      variant=torch_io.variant_name(v["width"], v["depth"], v["num_heads"], v["mlp_dim"], v["patch_size"]),
      image_size=v["image_size"], pos_embed="learned", layer_norm_eps=v["layer_norm_eps"],
      activation=v["activation"], scan=scan, width=v["width"], depth=v["depth"],
      num_heads=v["num_heads"], mlp_dim=v["mlp_dim"], ln_pre=clip, class_token=clip)
  tower = text.TextTransformer(
      width=t["width"], depth=t["depth"], num_heads=t["num_heads"], mlp_dim=t["mlp_dim"],
      context_length=t["context_length"], vocab_size=t["vocab_size"], causal=t["causal"],
      pooling=t["pooling"], eot_id=t["eot_id"], pad_id=t["pad_id"], mask_padding=t["mask_padding"],
      activation=t["activation"], layer_norm_eps=t["layer_norm_eps"], scan=scan)
  return clip_model.ImageTextModel(image, tower, cfg["embed_dim"], image_pool="cls" if clip else "map",
                                   image_proj=clip, text_proj_bias=not clip,
                                   init_logit_bias=None if clip else -10.0)


def _block(hf: str, ours: tuple[str, ...], heads: int) -> list[torch_io.Entry]:
  dense, norm = torch_io.dense_entries, torch_io.norm_entries
  return (torch_io.attention_entries(f"{hf}.self_attn", (*ours, "attn"), heads)
          + norm(f"{hf}.layer_norm1", (*ours, "norm1")) + norm(f"{hf}.layer_norm2", (*ours, "norm2"))
          + dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2")))


def _packed_qkv(heads: int):
  """nn.MultiheadAttention ``in_proj_weight [3D, D]`` / ``in_proj_bias [3D]`` -> our q/k/v."""
  def weights(w):
    return tuple(torch_io.qkv_kernel(x, heads) for x in np.split(w, 3, axis=0))

  def biases(b):
    return tuple(x.reshape(heads, -1) for x in np.split(b, 3))
  return weights, biases


def _mapping(cfg: dict[str, Any]) -> list[torch_io.Entry]:
  v, t, clip = cfg["vision"], cfg["text"], cfg["kind"] == "clip"
  entry, norm, dense = torch_io.entry, torch_io.norm_entries, torch_io.dense_entries
  img, vm = ("image",), "vision_model"
  m = [entry(f"{vm}.embeddings.patch_embedding.weight", (*img, "patch_embed", "proj", "kernel"),
             torch_io.patch_kernel)]
  if clip:   # cls + its position embedding folded into cls_token; patch positions -> pos_embed
    m.append(torch_io.Entry(
        (f"{vm}.embeddings.class_embedding", f"{vm}.embeddings.position_embedding.weight"),
        ((*img, "cls_token"), (*img, "pos_embed")),
        lambda c, p: ((c + p[0])[None, None], p[1:][None]), None))
    m += norm(f"{vm}.pre_layrnorm", (*img, "ln_pre"))
    m.append(entry("visual_projection.weight", ("image_projection", "kernel"), torch_io.transpose))
    m.append(entry("text_projection.weight", ("text_projection", "kernel"), torch_io.transpose))
  else:
    m.append(entry(f"{vm}.embeddings.patch_embedding.bias", (*img, "patch_embed", "proj", "bias")))
    m.append(entry(f"{vm}.embeddings.position_embedding.weight", (*img, "pos_embed"), lambda p: p[None]))
    w, b = _packed_qkv(v["num_heads"])
    head, ours = f"{vm}.head", ("map_head",)
    m.append(entry(f"{head}.probe", (*ours, "probe")))
    m.append(torch_io.Entry((f"{head}.attention.in_proj_weight",),
                            tuple((*ours, n, "kernel") for n in ("query", "key", "value")), w, None))
    m.append(torch_io.Entry((f"{head}.attention.in_proj_bias",),
                            tuple((*ours, n, "bias") for n in ("query", "key", "value")), b, None))
    m.append(entry(f"{head}.attention.out_proj.weight", (*ours, "out", "kernel"),
                   lambda x: torch_io.out_kernel(x, v["num_heads"])))
    m.append(entry(f"{head}.attention.out_proj.bias", (*ours, "out", "bias")))
    m += norm(f"{head}.layernorm", (*ours, "norm"))
    m += dense(f"{head}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{head}.mlp.fc2", (*ours, "mlp", "fc2"))
    m += dense("text_model.head", ("text_projection",))
    m.append(entry("logit_bias", ("logit_bias",), lambda x: x.reshape(())))
  for i in range(v["depth"]):
    m += _block(f"{vm}.encoder.layers.{i}", (*img, "encoder", f"layer_{i}"), v["num_heads"])
  m += norm(f"{vm}.post_layernorm", (*img, "norm"))
  tm = "text_model"
  m += [entry(f"{tm}.embeddings.token_embedding.weight", ("text", "token_embed")),
        entry(f"{tm}.embeddings.position_embedding.weight", ("text", "pos_embed"))]
  for i in range(t["depth"]):
    m += _block(f"{tm}.encoder.layers.{i}", ("text", "encoder", f"layer_{i}"), t["num_heads"])
  m += norm(f"{tm}.final_layer_norm", ("text", "norm"))
  m.append(entry("logit_scale", ("logit_scale",), lambda x: x.reshape(())))
  return m


@functools.lru_cache(maxsize=8)
def _expected_shapes_cached(key: str) -> dict:
  cfg = json.loads(key)
  model, v = build_model(cfg), cfg["vision"]
  images = jnp.zeros((1, v["image_size"], v["image_size"], v["channels"]))
  tokens = jnp.zeros((1, cfg["text"]["context_length"]), jnp.int32)
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(jax.random.key(0), images, tokens)["params"]))


def convert(state_dict, hf_config, scan: bool = False) -> dict:
  """HF ``CLIPModel`` / ``SiglipModel`` state dict (or module / checkpoint path) -> our
  ImageTextModel params (numpy float32, unrolled or scanned). One ValueError lists every unused,
  missing or mis-shaped tensor."""
  cfg = hf_config if isinstance(hf_config, dict) and "kind" in hf_config else config_from_hf(hf_config)
  sd = {k: v for k, v in torch_io.as_numpy_state_dict(state_dict).items()
        if not k.endswith("position_ids")}                                    # buffers
  sd = {k.replace(".self_attn.out_proj.", ".self_attn.o_proj."): v for k, v in sd.items()}
  expected = dict(_expected_shapes_cached(json.dumps(cfg, sort_keys=True)))
  bias = ("image", "patch_embed", "proj", "bias")
  zero_bias = expected.pop(bias) if cfg["kind"] == "clip" else None   # CLIP's patch conv has none
  flat = torch_io.convert_with_mapping(sd, _mapping(cfg), expected, f"convert ({cfg['kind']})")
  if zero_bias is not None:
    flat[bias] = np.zeros(zero_bias, np.float32)
  return torch_io.to_param_tree(flat, scan)
