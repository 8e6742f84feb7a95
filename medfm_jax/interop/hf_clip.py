"""Hugging Face ``CLIPModel`` / ``SiglipModel`` <-> ``medfm_jax`` :class:`ImageTextModel` weights.

``load(source)`` -> ``(module, params, config_overrides)``; ``export(params, config, out_dir)``
writes what ``from_pretrained`` loads (a run config too: :func:`cfg_from_run`). Padding is the
caller's ``attention_mask`` (``module.apply(..., attention_mask=...)``), never ``pad_token_id``
(HF CLIP's default 1 is an ordinary vocabulary id).

CLIP: ViT with ``ln_pre`` (``pre_layrnorm``), QuickGELU (or the config's activation), class
embedding + its position embedding folded into our ``cls_token`` (the sum is what the model sees),
patch convolution without bias (our patch bias is imported as zero and exported folded into the
patch positions), ``post_layernorm`` = our final norm
(applied to every token; the cls row is identical), projections without bias, EOT pooling (first
``eos_token_id``; argmax of the ids for configs with the legacy ``eos_token_id == 2``), causal text
attention. SigLIP: no cls token, attention-pooling head (``head.probe``, packed ``in_proj``), no
image projection, text pooled at the last position with a biased head, bidirectional text attention,
``logit_bias``. The mapping uses :mod:`medfm_jax.interop.torch_io`.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.data import tokenizers
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
             eot_id=eos, pad_id=int(t.get("pad_token_id", 1) or 0))
  # Padding comes from an attention mask (the caller's, as HF's), never from pad_token_id: HF
  # CLIP's default pad id 1 is an ordinary vocabulary id. CLIP's causal EOT pooling does not see
  # trailing padding anyway; SigLIP is run on full-length padded texts without a mask.
  if kind == "clip":
    txt.update(causal=True, pooling="argmax" if eos == 2 else "eot", mask_padding=False)
    embed_dim = int(raw.get("projection_dim", 512))
  else:
    txt.update(causal=False, pooling="last", mask_padding=False)
    embed_dim = int(t.get("projection_size", txt["width"]))
  return dict(kind=kind, vision=vis, text=txt, embed_dim=embed_dim)


def build_model(hf_config, scan: bool = False) -> clip_model.ImageTextModel:
  """Our ImageTextModel with the HF model's sizes (float32). Our family config may also set the
  open_clip options (:mod:`~medfm_jax.interop.openclip`): ``vision.ln_pre`` / ``layer_scale``,
  ``text.post_ln`` / ``embed_norm`` / ``pooler``, ``image_proj`` and ``text_proj``."""
  cfg = hf_config if isinstance(hf_config, dict) and "kind" in hf_config else config_from_hf(hf_config)
  v, t, clip = cfg["vision"], cfg["text"], cfg["kind"] == "clip"
  image = vit.VisionTransformer(
      variant=torch_io.variant_name(v["width"], v["depth"], v["num_heads"], v["mlp_dim"], v["patch_size"]),
      image_size=v["image_size"], pos_embed="learned", layer_norm_eps=v["layer_norm_eps"],
      activation=v["activation"], scan=scan, width=v["width"], depth=v["depth"],
      num_heads=v["num_heads"], mlp_dim=v["mlp_dim"], ln_pre=v.get("ln_pre", clip), class_token=clip,
      layer_scale_init=1.0 if v.get("layer_scale") else 0.0)
  tower = text.TextTransformer(
      width=t["width"], depth=t["depth"], num_heads=t["num_heads"], mlp_dim=t["mlp_dim"],
      context_length=t["context_length"], vocab_size=t["vocab_size"], causal=t["causal"],
      pooling=t["pooling"], eot_id=t["eot_id"], pad_id=t["pad_id"], mask_padding=t["mask_padding"],
      activation=t["activation"], layer_norm_eps=t["layer_norm_eps"], scan=scan,
      embed_norm=t.get("embed_norm", False), post_ln=t.get("post_ln", False), pooler=t.get("pooler", False))
  return clip_model.ImageTextModel(image, tower, cfg["embed_dim"], image_pool="cls" if clip else "map",
                                   image_proj=cfg.get("image_proj", clip), text_proj_bias=not clip,
                                   text_proj=cfg.get("text_proj", "linear"),
                                   init_logit_bias=None if clip else -10.0)


def _block(hf: str, ours: tuple[str, ...], heads: int) -> list[torch_io.Entry]:
  dense, norm = torch_io.dense_entries, torch_io.norm_entries
  return (torch_io.attention_entries(f"{hf}.self_attn", (*ours, "attn"), heads)
          + norm(f"{hf}.layer_norm1", (*ours, "norm1")) + norm(f"{hf}.layer_norm2", (*ours, "norm2"))
          + dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2")))


def _mapping(cfg: dict[str, Any]) -> list[torch_io.Entry]:
  v, t, clip = cfg["vision"], cfg["text"], cfg["kind"] == "clip"
  entry, norm, dense = torch_io.entry, torch_io.norm_entries, torch_io.dense_entries
  img, vm = ("image",), "vision_model"
  scalar = lambda x: x.reshape(())
  m = [entry(f"{vm}.embeddings.patch_embedding.weight", (*img, "patch_embed", "proj", "kernel"),
             torch_io.patch_kernel, functools.partial(torch_io.patch_kernel_to_torch, patch=v["patch_size"],
                                                      channels=v["channels"]))]
  if clip:   # cls + its position embedding folded into cls_token; patch positions -> pos_embed
    m.append(torch_io.fold_cls_position(f"{vm}.embeddings.class_embedding",
                                        f"{vm}.embeddings.position_embedding.weight", img, flat_cls=True,
                                        bias_free=True))
    m += norm(f"{vm}.pre_layrnorm", (*img, "ln_pre"))
    m.append(entry("visual_projection.weight", ("image_projection", "kernel"), torch_io.transpose,
                   torch_io.transpose))
    m.append(entry("text_projection.weight", ("text_projection", "kernel"), torch_io.transpose,
                   torch_io.transpose))
    m.append(entry("logit_scale", ("logit_scale",), scalar, scalar))
  else:
    m.append(entry(f"{vm}.embeddings.patch_embedding.bias", (*img, "patch_embed", "proj", "bias")))
    m.append(entry(f"{vm}.embeddings.position_embedding.weight", (*img, "pos_embed"), lambda p: p[None],
                   lambda p: p[0]))
    heads, hf, ours = v["num_heads"], f"{vm}.head", ("map_head",)
    m.append(entry(f"{hf}.probe", (*ours, "probe")))
    m += torch_io.packed_qkv_entries(f"{hf}.attention.in_proj_weight", f"{hf}.attention.in_proj_bias", ours, heads)
    m += torch_io.out_entries(f"{hf}.attention.out_proj", (*ours, "out"), heads)
    m += norm(f"{hf}.layernorm", (*ours, "norm"))
    m += dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2"))
    m += dense("text_model.head", ("text_projection",))
    m += [entry(name, (name,), scalar, lambda x: x.reshape(1)) for name in ("logit_scale", "logit_bias")]
  for i in range(v["depth"]):
    m += _block(f"{vm}.encoder.layers.{i}", (*img, "encoder", f"layer_{i}"), v["num_heads"])
  m += norm(f"{vm}.post_layernorm", (*img, "norm"))
  tm = "text_model"
  m += [entry(f"{tm}.embeddings.token_embedding.weight", ("text", "token_embed")),
        entry(f"{tm}.embeddings.position_embedding.weight", ("text", "pos_embed"))]
  for i in range(t["depth"]):
    m += _block(f"{tm}.encoder.layers.{i}", ("text", "encoder", f"layer_{i}"), t["num_heads"])
  return m + norm(f"{tm}.final_layer_norm", ("text", "norm"))


@functools.lru_cache(maxsize=8)
def _expected_shapes_cached(key: str) -> dict:
  cfg = json.loads(key)
  model, v = build_model(cfg), cfg["vision"]
  images = jnp.zeros((1, v["image_size"], v["image_size"], v["channels"]))
  tokens = jnp.zeros((1, cfg["text"]["context_length"]), jnp.int32)
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(jax.random.key(0), images, tokens)["params"]))


def expected_shapes(cfg: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of :func:`build_model`'s (unrolled) params for our family config."""
  return _expected_shapes_cached(json.dumps(cfg, sort_keys=True))


def _as_cfg(config) -> dict[str, Any]:
  """Our family config from itself, an HF config (object, dict, path) or a CLIP run config."""
  if isinstance(config, dict) and "kind" in config:
    return config
  if hasattr(config, "model") and hasattr(config, "objective"):
    return cfg_from_run(config)
  return config_from_hf(config)


def _normalize(state_dict: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
  sd = {k.replace(".self_attn.out_proj.", ".self_attn.o_proj."): v for k, v in state_dict.items()
        if not k.endswith("position_ids")}                                    # buffers
  if cfg["kind"] == "clip":   # a placeholder for the patch bias CLIP lacks (torch_io.fold_cls_position)
    sd[torch_io.NO_PATCH_BIAS] = np.zeros((cfg["vision"]["width"],), np.float32)
  return sd


def convert(state_dict, hf_config=None, scan: bool = False) -> dict:
  """HF ``CLIPModel`` / ``SiglipModel`` weights (state dict, torch module, file or directory; the
  config comes with the source unless given) -> our ImageTextModel params (numpy float32, unrolled
  or scanned). One ValueError lists every unused, missing or mis-shaped tensor."""
  state_dict, hf_config = torch_io.resolve_source(state_dict, hf_config, "HF CLIP/SigLIP")
  cfg = _as_cfg(hf_config)
  flat = torch_io.convert_with_mapping(_normalize(state_dict, cfg), _mapping(cfg), expected_shapes(cfg),
                                       f"convert ({cfg['kind']})")
  return torch_io.to_param_tree(flat, scan)


def config_overrides(hf_config) -> dict[str, Any]:
  """The run-config fields (``model.*``, ``model.text.*``, ``data.*``, ``objective.loss``) that make
  ``configs/clip.py`` build this model (e.g. to fine-tune it BiomedCLIP-style). The tokenizer is the
  run's own (``data.tokenizer``): its end-of-text id must be the HF model's for 'eot' pooling."""
  cfg = _as_cfg(hf_config)
  v, t, clip = cfg["vision"], cfg["text"], cfg["kind"] == "clip"
  post_ln = t.get("post_ln", False)
  out = torch_io.vit_run_fields(
      variant=torch_io.variant_name(v["width"], v["depth"], v["num_heads"], v["mlp_dim"], v["patch_size"]),
      width=v["width"], depth=v["depth"], num_heads=v["num_heads"], mlp_dim=v["mlp_dim"],
      layer_norm_eps=v["layer_norm_eps"], activation=v["activation"], pos_embed="learned",
      ln_pre=v.get("ln_pre", clip), class_token=clip, layer_scale_init=1.0 if v.get("layer_scale") else 0.0,
      image_pool="cls" if clip else "map", image_proj=cfg.get("image_proj", clip), text_proj_bias=not clip,
      text_proj=cfg.get("text_proj", "linear"), embed_dim=cfg["embed_dim"]) | {
          "data.image_size": v["image_size"], "data.channels": v["channels"], "objective.loss": cfg["kind"]}
  out |= {f"model.text.{k}": t[k] for k in ("width", "depth", "num_heads", "mlp_dim", "context_length",
                                            "vocab_size", "causal", "pooling", "activation",
                                            "layer_norm_eps", "mask_padding")}
  # A BERT tower in a run: its padding keys are masked by the run tokenizer's own pad id (runs pass
  # no attention mask); the imported module takes the caller's attention_mask instead.
  out |= {"model.text.embed_norm": t.get("embed_norm", False), "model.text.post_ln": post_ln,
          "model.text.pooler": t.get("pooler", False)} | ({"model.text.mask_padding": True} if post_ln else {})
  return out


def cfg_from_run(config) -> dict[str, Any]:
  """Our family config of a CLIP/SigLIP run config (``objective.loss`` picks the HF class); one
  ValueError line for what the HF class cannot express."""
  kind = "siglip" if config.objective.get("loss", "clip") == "siglip" else "clip"
  clip, what = kind == "clip", f"HF {kind}"
  v = torch_io.run_vit(config, what, pos_embed=("learned",), ln_pre=(clip,), class_token=(clip,),
                       layer_scale_init=(0.0,), num_registers=(0,), swiglu=(False,),
                       activation=tuple(_HF_ACTIVATIONS))
  m, t = config.model, text.text_size(config.model.text)
  tc = config.model.text
  torch_io.check_exportable(
      {"model.image_pool": m.get("image_pool", "cls"), "model.image_proj": m.get("image_proj", True),
       "model.text_proj_bias": m.get("text_proj_bias", False), "model.text.causal": t.causal,
       "model.text.pooling": t.pooling, "model.text.activation": t.activation,
       "model.text_proj": m.get("text_proj", "linear"), "model.text.post_ln": tc.get("post_ln", False),
       "model.text.embed_norm": tc.get("embed_norm", False), "model.text.pooler": tc.get("pooler", False)},
      {"model.image_pool": ("cls" if clip else "map",), "model.image_proj": (clip,),
       "model.text_proj_bias": (not clip,), "model.text.causal": (clip,),
       "model.text.pooling": ("eot", "argmax") if clip else ("last",),
       "model.text.activation": tuple(_HF_ACTIVATIONS), "model.text_proj": ("linear",),
       "model.text.post_ln": (False,), "model.text.embed_norm": (False,), "model.text.pooler": (False,)}, what)
  tok = tokenizers.from_config(config.data)
  vis = {k: v[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
                           "layer_norm_eps", "activation")}
  txt = dict(width=t.width, depth=t.depth, num_heads=t.num_heads, mlp_dim=t.mlp_dim,
             context_length=t.context_length, vocab_size=t.vocab_size, layer_norm_eps=t.layer_norm_eps,
             activation=t.activation, eot_id=tok.eot_id, pad_id=tok.pad_id, causal=t.causal,
             pooling=t.pooling, mask_padding=bool(config.model.text.get("mask_padding", True)))
  return dict(kind=kind, vision=vis, text=txt, embed_dim=int(m.embed_dim))


def load(source, hf_config=None, scan: bool = False) -> tuple[clip_model.ImageTextModel, dict, dict]:
  """``(module, params, config_overrides)`` from an HF ``CLIPModel`` / ``SiglipModel`` directory,
  weights file, state dict (with ``hf_config``) or torch module. Padding: pass the tokenizer's
  ``attention_mask`` to ``module.apply(..., attention_mask=...)`` as to HF; no id is padding."""
  state_dict, hf_config = torch_io.resolve_source(source, hf_config, "HF CLIP/SigLIP")
  cfg = _as_cfg(hf_config)
  return build_model(cfg, scan), convert(state_dict, cfg, scan), config_overrides(cfg)


_HF_ACTIVATIONS = torch_io.invert(_ACTIVATIONS)


def hf_config_dict(config) -> dict[str, Any]:
  """The HF ``config.json`` (``CLIPConfig`` / ``SiglipConfig``) of our model config."""
  cfg = _as_cfg(config)
  v, t, clip = cfg["vision"], cfg["text"], cfg["kind"] == "clip"
  vision = dict(hidden_size=v["width"], num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                intermediate_size=v["mlp_dim"], patch_size=v["patch_size"], image_size=v["image_size"],
                num_channels=v["channels"], layer_norm_eps=v["layer_norm_eps"],
                hidden_act=_HF_ACTIVATIONS[v["activation"]])
  txt = dict(hidden_size=t["width"], num_hidden_layers=t["depth"], num_attention_heads=t["num_heads"],
             intermediate_size=t["mlp_dim"], max_position_embeddings=t["context_length"],
             vocab_size=t["vocab_size"], layer_norm_eps=t["layer_norm_eps"],
             hidden_act=_HF_ACTIVATIONS[t["activation"]], pad_token_id=t["pad_id"],
             eos_token_id=2 if t["pooling"] == "argmax" else t["eot_id"])
  if clip:
    return dict(model_type="clip", architectures=["CLIPModel"], projection_dim=cfg["embed_dim"],
                vision_config=vision, text_config=txt)
  return dict(model_type="siglip", architectures=["SiglipModel"], vision_config=vision,
              text_config=txt | dict(projection_size=cfg["embed_dim"]))


def export(params: dict, config, out_dir) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that ``transformers.CLIPModel`` /
  ``SiglipModel.from_pretrained(out_dir)`` loads. ``config``: what :func:`load` took, our family
  config or a CLIP run config (options HF cannot express are refused in one line)."""
  cfg = _as_cfg(config)
  sd = torch_io.export_with_mapping(torch_io.from_param_tree(params), _mapping(cfg), f"export ({cfg['kind']})")
  sd = {k.replace(".self_attn.o_proj.", ".self_attn.out_proj."): v for k, v in sd.items()}
  return torch_io.write_hf(out_dir, sd, hf_config_dict(cfg))
