"""Hugging Face ``FlavaForPreTraining`` / ``FlavaModel`` <-> ``medfm_jax`` :class:`~medfm_jax.models.flava.Flava`.

Usage (offline; a model object, or a Hub snapshot directory such as ``facebook/flava-full``
downloaded beforehand)::

    from medfm_jax.interop import hf_flava
    model, params, overrides = hf_flava.load(transformers.FlavaForPreTraining.from_pretrained(path))
    model, params, overrides = hf_flava.load("/ckpts/flava-full", scan=True)
    out = model.apply({"params": params}, images, tokens)   # images NHWC, HF-normalised

Equivalences (float32 parity <= 1e-5 in tests/interop/test_hf_flava_parity.py):

* Blocks: HF ``FlavaLayer`` is pre-LN (``layernorm_before`` / ``layernorm_after``) = our Block.
* Image: ``cls_token + position_embeddings[:, 0]`` folded into our ``cls_token`` (exact: both are
  added before any other op); ``bool_masked_pos`` = our ``patch_mask`` (mask token swapped in
  before position embeddings). Import at the resolution you run (no run-time resampling here).
* Text: ``token_type_embeddings[0]`` (HF's default all-zero token types) folded into our
  ``pos_embed``; ``embeddings.LayerNorm`` = our ``embed_norm``; HF ``attention_mask`` = our
  ``attention_mask`` argument (never derived from ``pad_token_id``), applied to the text tower and,
  as keys, the fusion encoder.
* Fusion: HF feeds ``image_to_mm_projection`` / ``text_to_mm_projection`` the towers' last hidden
  states *before* their final LN (``hidden_states[-1]``) = our ``encode_*(..., return_pre_norm=True)``.
* Heads: ``*_head.transform.{dense,LayerNorm}`` + ``decoder`` = our ``{dense,norm,decoder}``; the
  separate ``*_head.bias`` is tied to ``decoder.bias`` (not imported; export writes both).
  ``itm_head.{pooler.dense,seq_relationship}`` = our ``itm_head/{pooler,classifier}``.
* Not imported: the towers' own ``pooler`` layers (unused by every FLAVA output; export writes
  zeros) and the DALL-E ``image_codebook`` (our codebook MIM target comes from a tokenizer
  checkpoint the user supplies; export omits it: build the HF model with ``init_codebook=False``).
  ``FlavaModel`` has no heads: its params come back without the head subtrees.

Losses HF computes differently from METHODS.md / our FLAVA objective:

* Contrastive: from a separate *unmasked* forward (``input_ids`` and no ``bool_masked_pos``), the
  LN'd cls states projected and L2-normalised; the scale is clamped to [0, 4.6052] only in
  training mode; with ``itm_labels`` HF keeps only the rows of positive pairs (``pos_mask``).
* ITM / MMM: HF runs them on the *masked* forward and samples no negatives itself: the caller
  builds mismatched pairs and passes ``itm_labels``; ITM cross-entropy is over all rows, MMM and
  contrastive over ``pos_mask = itm_labels != 0`` -- and over *all* rows when a batch has no
  positive pair (ours: positive pairs only, 0 when there are none).
* MIM / MLM run only when the fusion encoder did not (an image-only or text-only forward);
  paired forwards give MMM, ITM and contrastive only.
* ``ce_ignore_index`` (-100) labels are dropped by boolean indexing before a mean cross-entropy:
  a batch with no masked token gives NaN in HF (ours: 0 with zero gradient). HF also resets MIM
  labels outside ``bool_masked_pos`` to the ignore index; MIM targets default to the dVAE codebook
  ids of a second, 112 px ``codebook_pixel_values`` input (ours: codebook ids or normalised pixels).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.data import tokenizers
from medfm_jax.interop import torch_io
from medfm_jax.models import flava, text, vit

__all__ = ["load", "export", "config_overrides", "hf_config_dict", "cfg_from_run", "config_from_hf", "build_model",
           "convert_flava", "export_flava"]

_WHAT = "HF FLAVA"
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu"}
_TOWER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True)
_IMAGE_DEFAULTS = dict(_TOWER_DEFAULTS, image_size=224, patch_size=16, num_channels=3, vocab_size=8192)
_TEXT_DEFAULTS = dict(_TOWER_DEFAULTS, vocab_size=30522, type_vocab_size=2, max_position_embeddings=512,
                      pad_token_id=0)
_MM_DEFAULTS = dict(_TOWER_DEFAULTS, num_hidden_layers=6, use_cls_token=True)
_HEADS = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head", "itm_head")
_RENAMES = ((".attention.attention.query.", ".attention.q_proj."),
            (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."),
            (".attention.output.dense.", ".attention.o_proj."))
_POOLERS = tuple(f"flava.{m}.pooler.dense.{p}" for m in ("image_model", "text_model", "multimodal_model")
                 for p in ("weight", "bias"))


def config_from_hf(hf_config) -> dict[str, Any]:
  """Our hyperparameters from a ``FlavaConfig`` (object, dict, or ``config.json`` path / directory)."""
  raw = torch_io.read_hf_config(hf_config, _WHAT)
  if raw.get("model_type", "flava") != "flava":
    raise ValueError(f"{_WHAT} config model_type={raw.get('model_type')!r}: expected 'flava'")
  sub = lambda name, defaults: {k: (raw.get(name) or {}).get(k, v) for k, v in defaults.items()}
  cfg = dict(image=sub("image_config", _IMAGE_DEFAULTS), text=sub("text_config", _TEXT_DEFAULTS),
             mm=sub("multimodal_config", _MM_DEFAULTS), embed_dim=int(raw.get("projection_dim", 768)),
             itm_width=int(raw.get("hidden_size", 768)),
             logit_scale_init=float(raw.get("logit_scale_init_value", 2.6592)))
  problems = []
  for name in ("image", "text", "mm"):
    c = cfg[name]
    if c["hidden_act"] not in _ACTIVATIONS:
      problems.append(f"{name}.hidden_act={c['hidden_act']!r} (allowed {sorted(_ACTIVATIONS)})")
    if not c["qkv_bias"]:
      problems.append(f"{name}.qkv_bias=False (only True)")
  if not cfg["mm"]["use_cls_token"]:
    problems.append("multimodal_config.use_cls_token=False (only True)")
  if cfg["itm_width"] != cfg["mm"]["hidden_size"]:
    problems.append(f"hidden_size={cfg['itm_width']} != multimodal hidden_size={cfg['mm']['hidden_size']}")
  img = cfg["image"]
  img["image_size"] = torch_io.square(img["image_size"], "image_size", _WHAT)
  img["patch_size"] = torch_io.square(img["patch_size"], "patch_size", _WHAT)
  if img["image_size"] % img["patch_size"]:
    problems.append(f"image_size={img['image_size']} not divisible by patch_size={img['patch_size']}")
  if problems:
    raise ValueError(f"unsupported {_WHAT} config: " + "; ".join(problems))
  cfg["text"]["pad_token_id"] = int(cfg["text"]["pad_token_id"] or 0)
  return cfg


def cfg_from_run(config) -> dict[str, Any]:
  """Our FLAVA config of a FLAVA run config; one ValueError line for what HF FLAVA cannot express."""
  hf_act = torch_io.invert(_ACTIVATIONS)
  v = torch_io.run_vit(config, _WHAT, pos_embed=("learned",), layer_scale_init=(0.0,), num_registers=(0,),
                       swiglu=(False,), ln_pre=(False,), class_token=(True,), activation=tuple(hf_act))
  m, t = config.model, text.text_size(config.model.text)
  mm = m.multimodal
  torch_io.check_exportable(
      {"model.text.causal": t.causal, "model.text.pooling": t.pooling, "model.text.activation": t.activation,
       "model.text.embed_norm": bool(m.text.get("embed_norm", False)),
       "model.multimodal.activation": mm.get("activation", "gelu")},
      {"model.text.causal": (False,), "model.text.pooling": ("cls",), "model.text.activation": tuple(hf_act),
       "model.text.embed_norm": (True,), "model.multimodal.activation": tuple(hf_act)}, _WHAT)
  tower = lambda width, depth, heads, mlp, act, eps: dict(
      hidden_size=int(width), num_hidden_layers=int(depth), num_attention_heads=int(heads),
      intermediate_size=int(mlp), hidden_act=hf_act[act], layer_norm_eps=float(eps), qkv_bias=True)
  image = tower(v["width"], v["depth"], v["num_heads"], v["mlp_dim"], v["activation"], v["layer_norm_eps"]) | dict(
      image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["channels"],
      vocab_size=flava.image_vocab_from_config(config))
  txt = tower(t.width, t.depth, t.num_heads, t.mlp_dim, t.activation, t.layer_norm_eps) | dict(
      vocab_size=t.vocab_size, type_vocab_size=2, max_position_embeddings=t.context_length,
      pad_token_id=tokenizers.from_config(config.data).pad_id)
  fused = tower(mm.width, mm.depth, mm.num_heads, mm.mlp_dim, mm.get("activation", "gelu"),
                mm.get("layer_norm_eps", 1e-12)) | dict(use_cls_token=True)
  scale = float((config.get("objective") or {}).get("init_logit_scale", 2.6592))
  return dict(image=image, text=txt, mm=fused, embed_dim=int(m.embed_dim), itm_width=int(mm.width),
              logit_scale_init=scale)


def _as_cfg(config) -> dict[str, Any]:
  """Our FLAVA config from itself, an HF config (object, dict, path) or a FLAVA run config."""
  return torch_io.as_family_cfg(config, "mm", cfg_from_run, config_from_hf)


def build_model(hf_config, scan: bool = False, **overrides) -> flava.Flava:
  """Our Flava with the HF model's sizes; ``overrides`` (dtype, ...) go to the Flava constructor."""
  cfg = _as_cfg(hf_config)
  i, t, m = cfg["image"], cfg["text"], cfg["mm"]
  sizes = lambda c: (int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"]),
                     int(c["intermediate_size"]))
  w, d, h, mlp = sizes(i)
  image = vit.VisionTransformer(
      variant=torch_io.variant_name(w, d, h, mlp, i["patch_size"]), width=w, depth=d, num_heads=h,
      mlp_dim=mlp, image_size=i["image_size"], pos_embed="learned", layer_norm_eps=float(i["layer_norm_eps"]),
      activation=_ACTIVATIONS[i["hidden_act"]], mask_token=True, scan=scan)
  w, d, h, mlp = sizes(t)
  tower = text.TextTransformer(
      width=w, depth=d, num_heads=h, mlp_dim=mlp, context_length=int(t["max_position_embeddings"]),
      vocab_size=int(t["vocab_size"]), causal=False, pooling="cls", eot_id=-1, pad_id=t["pad_token_id"],
      mask_padding=False, activation=_ACTIVATIONS[t["hidden_act"]], layer_norm_eps=float(t["layer_norm_eps"]),
      embed_norm=True, scan=scan)
  w, d, h, mlp = sizes(m)
  kwargs = dict(mm_width=w, mm_depth=d, mm_heads=h, mm_mlp_dim=mlp, embed_dim=cfg["embed_dim"],
                image_vocab=int(i["vocab_size"]), text_vocab=int(t["vocab_size"]),
                layer_norm_eps=float(m["layer_norm_eps"]), activation=_ACTIVATIONS[m["hidden_act"]],
                init_logit_scale=cfg["logit_scale_init"])
  return flava.Flava(image, tower, **(kwargs | overrides))


# ---------------------------------------------------------------------------------------------
# name/layout mapping (torch_io.Entry list)

def _encoder(hf: str, ours: tuple[str, ...], c: dict[str, Any]) -> list[torch_io.Entry]:
  dense, norm = torch_io.dense_entries, torch_io.norm_entries
  m = []
  for i in range(int(c["num_hidden_layers"])):
    h, o = f"{hf}.encoder.layer.{i}", (*ours, "encoder", f"layer_{i}")
    m += torch_io.attention_entries(f"{h}.attention", (*o, "attn"), int(c["num_attention_heads"]))
    m += norm(f"{h}.layernorm_before", (*o, "norm1")) + norm(f"{h}.layernorm_after", (*o, "norm2"))
    m += dense(f"{h}.intermediate.dense", (*o, "mlp", "fc1")) + dense(f"{h}.output.dense", (*o, "mlp", "fc2"))
  return m + norm(f"{hf}.layernorm", (*ours, "norm"))


def _mapping(cfg: dict[str, Any], heads: bool) -> list[torch_io.Entry]:
  entry, dense, norm = torch_io.entry, torch_io.dense_entries, torch_io.norm_entries
  i, t = cfg["image"], cfg["text"]
  im, tm = "flava.image_model", "flava.text_model"
  n_types = int(t["type_vocab_size"])
  m = [torch_io.fold_cls_position(f"{im}.embeddings.cls_token", f"{im}.embeddings.position_embeddings", ("image",)),
       entry(f"{im}.embeddings.mask_token", ("image", "mask_token")),
       entry(f"{im}.embeddings.patch_embeddings.projection.weight", ("image", "patch_embed", "proj", "kernel"),
             torch_io.patch_kernel, functools.partial(torch_io.patch_kernel_to_torch, patch=i["patch_size"],
                                                      channels=int(i["num_channels"]))),
       entry(f"{im}.embeddings.patch_embeddings.projection.bias", ("image", "patch_embed", "proj", "bias")),
       entry(f"{tm}.embeddings.word_embeddings.weight", ("text", "token_embed")),
       torch_io.Entry((f"{tm}.embeddings.position_embeddings.weight", f"{tm}.embeddings.token_type_embeddings.weight"),
                      (("text", "pos_embed"),), lambda p, tt: (p + tt[0],),
                      lambda p: (p, np.zeros((n_types, p.shape[-1]), np.float32))),
       entry("flava.multimodal_model.cls_token", ("multimodal", "cls_token")),
       entry("flava.logit_scale", ("logit_scale",), lambda x: x.reshape(()), lambda x: x.reshape(()))]
  m += norm(f"{tm}.embeddings.LayerNorm", ("text", "embed_norm"))
  m += _encoder(im, ("image",), i) + _encoder(tm, ("text",), t)
  m += _encoder("flava.multimodal_model", ("multimodal",), cfg["mm"])
  for hf, ours in (("image_projection", "image_projection"), ("text_projection", "text_projection"),
                   ("image_to_mm_projection", "image_to_mm"), ("text_to_mm_projection", "text_to_mm")):
    m += dense(f"flava.{hf}", (ours,))
  if heads:
    for h in _HEADS[:4]:
      m += dense(f"{h}.transform.dense", (h, "dense")) + norm(f"{h}.transform.LayerNorm", (h, "norm"))
      m += dense(f"{h}.decoder", (h, "decoder"))
    m += dense("itm_head.pooler.dense", ("itm_head", "pooler"))
    m += dense("itm_head.seq_relationship", ("itm_head", "classifier"))
  return m


@functools.lru_cache(maxsize=8)
def _expected_shapes_cached(key: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  cfg = json.loads(key)
  model, s = build_model(cfg), cfg["image"]["image_size"]
  images = jnp.zeros((1, s, s, int(cfg["image"]["num_channels"])))
  tokens = jnp.zeros((1, 2), jnp.int32)
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(jax.random.key(0), images, tokens)["params"]))


def _normalize(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
  """-> (state dict with ``FlavaForPreTraining`` names and current attention names, has heads)."""
  if not any(k.startswith("flava.") for k in state_dict):       # a FlavaModel
    state_dict = {f"flava.{k}": v for k, v in state_dict.items()}
  out = {}
  for name, value in state_dict.items():
    for old, new in _RENAMES:
      name = name.replace(old, new)
    out[name] = value
  return out, any(k.startswith(_HEADS) for k in out)


def convert_flava(source, hf_config=None, scan: bool = False) -> dict:
  """HF ``FlavaForPreTraining`` / ``FlavaModel`` weights -> our Flava params (numpy float32,
  unrolled or scanned). ``source``: a torch module (its ``.config`` is used), a state dict, or a
  checkpoint file / HF directory (its ``config.json``); ``hf_config`` overrides. One ValueError
  names every unused / missing / mis-shaped tensor."""
  state_dict, hf_config = torch_io.resolve_source(source, hf_config, _WHAT)
  cfg = _as_cfg(hf_config)
  sd, heads = _normalize({k: v for k, v in state_dict.items() if not k.startswith("image_codebook.")
                          and not k.endswith(("position_ids", "token_type_ids"))})
  width = int(cfg["image"]["hidden_size"])
  sd.setdefault("flava.image_model.embeddings.mask_token", np.zeros((1, 1, width), np.float32))
  expected = dict(_expected_shapes_cached(json.dumps(cfg, sort_keys=True)))
  if not heads:
    expected = {k: v for k, v in expected.items() if k[0] not in _HEADS}
  consumed = tuple(n for n in _POOLERS + tuple(f"{h}.bias" for h in _HEADS[:4]) if n in sd)
  flat = torch_io.convert_with_mapping(sd, _mapping(cfg, heads), expected, "convert_flava", consumed)
  return torch_io.to_param_tree(flat, scan)


def export_flava(params: dict, hf_config) -> dict[str, np.ndarray]:
  """Inverse of :func:`convert_flava`: a ``FlavaForPreTraining`` state dict (``FlavaModel`` names when
  ``params`` has no heads) that ``load_state_dict(strict=True)`` accepts for a model built with
  ``init_codebook=False``. The unused tower poolers are written as zeros."""
  cfg = _as_cfg(hf_config)
  flat = torch_io.from_param_tree(params)
  heads = any(k[0] in _HEADS for k in flat)
  out = torch_io.export_with_mapping(flat, _mapping(cfg, heads), "export_flava")
  for name in _POOLERS:
    tower = {"image_model": "image", "text_model": "text", "multimodal_model": "mm"}[name.split(".")[1]]
    d = int(cfg[tower]["hidden_size"])
    out[name] = np.zeros((d, d) if name.endswith("weight") else (d,), np.float32)
  if heads:
    out.update({f"{h}.bias": out[f"{h}.decoder.bias"].copy() for h in _HEADS[:4]})
  for hf_name, ours in _RENAMES:
    out = {k.replace(ours, hf_name): v for k, v in out.items()}
  return out if heads else {k[len("flava."):]: v for k, v in out.items()}


def config_overrides(hf_config) -> dict[str, Any]:
  """The run-config fields that make ``configs/flava.py`` build this model."""
  cfg = _as_cfg(hf_config)
  i, t, m = cfg["image"], cfg["text"], cfg["mm"]
  sizes = lambda c: dict(width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]),
                         num_heads=int(c["num_attention_heads"]), mlp_dim=int(c["intermediate_size"]))
  # No model.image_vocab: a run's MIM output size is its own target's (pixels or its codebook); HF's
  # MIM heads (DALL-E codebook ids) are imported only where they fit (train.restore).
  image = sizes(i) | dict(variant=torch_io.variant_name(*sizes(i).values(), i["patch_size"]), pos_embed="learned",
                          layer_norm_eps=float(i["layer_norm_eps"]), activation=_ACTIVATIONS[i["hidden_act"]],
                          mask_token=True, embed_dim=cfg["embed_dim"],
                          # HF's plain ViT, not configs/flava.py:tiny's tower
                          patch_embed="patch", cls_pool="token", layer_scale_init=0.0)
  text_fields = sizes(t) | dict(context_length=int(t["max_position_embeddings"]), vocab_size=int(t["vocab_size"]),
                                causal=False, pooling="cls", activation=_ACTIVATIONS[t["hidden_act"]],
                                layer_norm_eps=float(t["layer_norm_eps"]), embed_norm=True)
  mm = sizes(m) | dict(layer_norm_eps=float(m["layer_norm_eps"]), activation=_ACTIVATIONS[m["hidden_act"]])
  return ({f"model.{k}": v for k, v in image.items()} | {f"model.text.{k}": v for k, v in text_fields.items()}
          | {f"model.multimodal.{k}": v for k, v in mm.items()}
          | {"data.image_size": i["image_size"], "data.channels": int(i["num_channels"]),
             "objective.init_logit_scale": cfg["logit_scale_init"]})


def load(source, hf_config=None, scan: bool = False, **overrides) -> tuple[flava.Flava, dict, dict]:
  """``(module, params, config_overrides)`` from an HF ``FlavaForPreTraining`` / ``FlavaModel``
  directory, weights file, state dict (with ``hf_config``) or torch module; ``overrides`` (dtype, ...)
  go to the Flava constructor. Padding: pass HF's ``attention_mask`` to the text methods."""
  state_dict, hf_config = torch_io.resolve_source(source, hf_config, _WHAT)
  cfg = _as_cfg(hf_config)
  return build_model(cfg, scan, **overrides), convert_flava(state_dict, cfg, scan), config_overrides(cfg)


def hf_config_dict(config) -> dict[str, Any]:
  """The HF ``config.json`` (``FlavaConfig``, no DALL-E codebook) of our FLAVA config."""
  cfg = _as_cfg(config)
  return dict(model_type="flava", architectures=["FlavaForPreTraining"], image_config=dict(cfg["image"]),
              text_config=dict(cfg["text"]), multimodal_config=dict(cfg["mm"]), hidden_size=cfg["itm_width"],
              projection_dim=cfg["embed_dim"], logit_scale_init_value=cfg["logit_scale_init"], init_codebook=False)


def export(params: dict, config, out_dir) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that ``FlavaForPreTraining.from_pretrained``
  (``FlavaModel`` for params without heads) loads. ``config``: what :func:`load` took, our FLAVA
  config or a FLAVA run config."""
  cfg = _as_cfg(config)
  sd = export_flava(params, cfg)
  hf = hf_config_dict(cfg)
  if not any(k.startswith("flava.") for k in sd):
    hf["architectures"] = ["FlavaModel"]
  return torch_io.write_hf(out_dir, sd, hf)
