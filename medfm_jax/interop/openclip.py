"""open_clip ``CLIP`` / ``CustomTextCLIP`` <-> our :class:`~medfm_jax.models.clip.ImageTextModel`.

Layouts: the image tower is open_clip's own ViT (``visual.*``) or a timm ViT (``visual.trunk.*`` +
``visual.head.proj``, ``vision_cfg.timm_model_name``); the text tower is open_clip's own
transformer (``transformer.*``, ``token_embedding``, ...) or a Hugging Face BERT
(``text.transformer.*`` + ``text.proj``, ``text_cfg.hf_model_name``). BiomedCLIP is timm ViT-B/16
+ PubMedBERT (``hf_proj_type='mlp'``, ``hf_pooler_type='cls_last_hidden_state_pooler'``).

Usage (offline; an open_clip Hub snapshot directory holding ``open_clip_config.json`` and
``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, a state dict with its
``model_cfg``, or an ``open_clip`` model with its ``model_cfg``)::

    from medfm_jax.interop import openclip
    model, params, overrides = openclip.load("/ckpts/openclip-vit-b-16")
    img, txt = model.apply({"params": params}, images, tokens)   # NHWC; open_clip's tokenizer ids
    openclip.export(params, "/ckpts/openclip-vit-b-16", "/out/clip")  # open_clip.create_model("local-dir:/out/clip")
    # BiomedCLIP: the BERT config comes from text_cfg.hf_model_name when it is a local directory, else
    # from the HF cache, else pass it; padding comes from the attention mask you pass (as open_clip's
    # tokens != pad_token_id)
    model, params, _ = openclip.load("/ckpts/BiomedCLIP", hf_text_config="/ckpts/BiomedBERT/config.json")
    img, txt = model.apply({"params": params}, images, tokens, attention_mask=tokens != 0)

Equivalences (float32 parity <= 1e-5 in tests/interop/test_openclip_parity.py): ``class_embedding``
+ its position folded into our cls token; ``conv1`` has no bias (ours: zeros; export folds ours into
the patch positions); ``ln_post`` = our final norm (applied to every token, the cls row is the same);
``proj`` / ``text_projection`` are ``[in, out]`` matrices = our kernels; packed ``in_proj`` q/k/v;
text pooled at the largest id (``pool_type='argmax'``), the first ``eos_id`` (``'eos'``) or the last
position (``'last'``), causal attention, no padding mask; LayerNorm eps 1e-5; QuickGELU when
``quick_gelu``. timm tower: as :mod:`~medfm_jax.interop.timm_vit` (token pooling, ``timm_pool`` ''
or 'token'), ``head.proj`` (no bias) = our image projection (``timm_proj='none'``: none). BERT tower
(our ``post_ln`` + ``embed_norm`` text tower): ``token_type_embeddings[0]`` (open_clip passes no
token types) folded into our positions (export writes zero token types); BERT's pooler = our
``pooler`` (``cls_pooler``); ``cls_last_hidden_state_pooler`` / ``mean_pooler`` = our 'cls' / 'mean'
pooling; ``hf_proj_type`` 'linear' / 'mlp' / none = our ``text_proj``. Export writes the BERT
``config.json`` to ``OUT/hf_text`` and a timm tower's ``config.json`` to ``OUT/timm_trunk`` and names
them by absolute path in ``open_clip_config.json`` (replace them with Hub names of the same
architecture to publish, e.g. ``vit_base_patch16_224`` for BiomedCLIP's trunk). SigLIP layout
(``init_logit_bias``): a timm ``vit_*_siglip_*`` trunk (no class token, MAP pooling ``attn_pool`` = our
``map_head``, no projection) + open_clip's own bidirectional text tower pooled at the last position
with a biased ``text_projection`` Linear, LN eps from ``norm_kwargs``; our SigLIP model. Not
supported (one-line error): other timm models or pools, ``act_kwargs``, HF towers other than
absolute-position BERT, LayerScale in open_clip's own ViT, attentional pooling, q/k norm and the
other block options.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import numpy as np

from medfm_jax.data import tokenizers
from medfm_jax.interop import hf_clip, timm_vit, torch_io
from medfm_jax.models import clip as clip_model
from medfm_jax.models import layers
from medfm_jax.models import text as text_lib

__all__ = ["load", "export", "config_from_open_clip", "open_clip_config", "config_overrides", "cfg_from_run"]

_WHAT = "open_clip CLIP"
_CONFIG = "open_clip_config.json"
_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
EPS = 1e-5
# open_clip CLIPVisionCfg / CLIPTextCfg defaults of the fields read here, and the fields whose
# non-default values (or presence) we cannot express.
_VISION = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
               timm_pool="avg", timm_proj="linear", timm_proj_bias=False)
_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0, pad_id=0,
             eos_id=2, pool_type="argmax", no_causal_mask=False, hf_proj_type="mlp", hf_pooler_type="mean_pooler")
_FIXED = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False, final_ln_after_pool=False,
              act_kwargs=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
              scale_attn_inner=False, scale_attn=False, scale_fc=False, embed_cls=False, block_type=None)
_POOLS = {"argmax": "argmax", "eos": "eot", "last": "last"}
# open_clip HF text tower poolers -> (our pooling, BERT pooler layer)
_HF_POOLERS = {"cls_pooler": ("cls", True), "cls_last_hidden_state_pooler": ("cls", False),
               "mean_pooler": ("mean", False)}
_HF_PROJS = {"linear": "linear", "mlp": "mlp", None: "none"}
# timm ViT sizes by name: vit_{size}_patch{P}_{S} -> (width, depth, heads)
_TIMM_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
               "huge": (1280, 32, 16)}
_BERT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             hidden_act="gelu", max_position_embeddings=512, vocab_size=30522, type_vocab_size=2,
             layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute")
_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_TEXT_DIR, _TIMM_DIR = "hf_text", "timm_trunk"


def _timm_tower(v: dict[str, Any], bad: list[str]) -> dict[str, Any] | None:
  """Our timm-ViT config of ``vision_cfg.timm_model_name`` (a ``vit_{size}_patch{P}_{S}`` name or
  ``local-dir:`` a timm ``config.json``); appends what is not supported to ``bad``."""
  name = str(v["timm_model_name"])
  args: dict[str, Any] = {}
  if name.startswith("local-dir:"):
    path = torch_io.epath_of(name[len("local-dir:"):]) / "config.json"
    if not path.is_file():
      bad.append(f"vision_cfg.timm_model_name={name!r}: no {os.fspath(path)}")
      return None
    raw = json.loads(path.read_text())
    name, args = str(raw.get("architecture", "")), dict(raw.get("model_args") or {})
  m = re.fullmatch(r"vit_([a-z]+)_patch(\d+)(_siglip)?_(\d+)", name.split(".")[0])
  if not m or m[1] not in _TIMM_SIZES:
    bad.append(f"vision_cfg.timm_model_name={v['timm_model_name']!r} (allowed vit_{{{','.join(_TIMM_SIZES)}}}"
               "_patch<P>[_siglip]_<S> or local-dir: such a timm ViT)")
    return None
  width, depth, heads = _TIMM_SIZES[m[1]]
  siglip = bool(m[3])          # timm's SigLIP ViTs: no class token, MAP pooling (attn_pool)
  a = dict(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=int(m[2]),
           img_size=int(m[4]), in_chans=3, pre_norm=False, init_values=None,
           global_pool="map" if siglip else "token", class_token=not siglip, reg_tokens=0, no_embed_class=False,
           fc_norm=None, qk_norm=False) | args
  pool, proj = v["timm_pool"], v["timm_proj"]
  map_pool = pool == "map" or (pool == "" and a["global_pool"] == "map")
  for k, ok in (("global_pool", "map" if map_pool else "token"), ("class_token", not map_pool), ("reg_tokens", 0),
                ("no_embed_class", False), ("fc_norm", None), ("qk_norm", False)):
    if a[k] != ok:
      bad.append(f"vision_cfg.timm_model_name model_args.{k}={a[k]!r} (allowed {ok!r})")
  if proj not in ("linear", "none"):
    bad.append(f"vision_cfg.timm_proj={proj!r} (allowed 'linear', 'none')")
  if map_pool and proj != "none":
    bad.append(f"vision_cfg.timm_proj={proj!r} with MAP pooling (allowed 'none')")
  elif not map_pool and pool not in (("", "token") if proj == "linear" else ("token",)):
    bad.append(f"vision_cfg.timm_pool={pool!r} (allowed {'<empty>, ' if proj == 'linear' else ''}'token'"
               f"{', ' + repr('map') if proj == 'none' else ''} with timm_proj={proj!r})")
  if v["timm_proj_bias"]:
    bad.append("vision_cfg.timm_proj_bias=True (allowed False)")
  w = int(a["embed_dim"])
  return dict(tower="timm", width=w, depth=int(a["depth"]), num_heads=int(a["num_heads"]),
              mlp_dim=int(w * a["mlp_ratio"]), patch_size=torch_io.square(a["patch_size"], "patch_size", _WHAT),
              image_size=torch_io.square(a["img_size"], "image_size", _WHAT), channels=int(a["in_chans"]),
              layer_norm_eps=timm_vit.EPS, activation="gelu", ln_pre=bool(a["pre_norm"]),
              layer_scale=a["init_values"] is not None, class_token=not map_pool)


def _bert_config(name: str, hf_text_config) -> dict[str, Any] | None:
  """The BERT ``config.json`` dict of ``hf_text_config`` (dict, object or path), else of
  ``hf_model_name`` as a local directory, else from the Hugging Face cache (no network); None when
  none has it."""
  if hf_text_config is not None:
    return torch_io.read_hf_config(hf_text_config, "HF text tower")
  if name and (torch_io.epath_of(name) / "config.json").is_file():
    return torch_io.read_hf_config(name, "HF text tower")
  try:
    from transformers.utils.hub import try_to_load_from_cache  # optional: the 'parity' extra; pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  try:
    cached = try_to_load_from_cache(name, "config.json")
  except ValueError:     # not a Hub repo id (e.g. a missing local path)
    return None
  return torch_io.read_hf_config(cached, "HF text tower") if isinstance(cached, str) else None


def _hf_tower(t: dict[str, Any], hf_text_config, bad: list[str]) -> dict[str, Any] | None:
  """Our post-LN text config of ``text_cfg.hf_model_name`` (a BERT); appends problems to ``bad``."""
  name = str(t["hf_model_name"])
  raw = _bert_config(name, hf_text_config)
  if raw is None:
    bad.append(f"text_cfg.hf_model_name={name!r}: its config.json is neither a local directory nor in the HF "
               "cache; pass hf_text_config= (the BERT config.json)")
    return None
  b = _BERT | {k: raw[k] for k in _BERT if raw.get(k) is not None}
  for k, ok in (("model_type", ("bert",)), ("position_embedding_type", ("absolute",)),
                ("hidden_act", tuple(_BERT_ACTIVATIONS))):
    value = raw.get(k, b.get(k, "bert"))
    if value not in ok:
      bad.append(f"text_cfg.hf_model_name {k}={value!r} (allowed {', '.join(map(repr, ok))})")
  if t["hf_pooler_type"] not in _HF_POOLERS:
    bad.append(f"text_cfg.hf_pooler_type={t['hf_pooler_type']!r} (allowed {sorted(_HF_POOLERS)})")
  if t["hf_proj_type"] not in _HF_PROJS:
    bad.append(f"text_cfg.hf_proj_type={t['hf_proj_type']!r} (allowed 'linear', 'mlp', None)")
  pooling, pooler = _HF_POOLERS.get(t["hf_pooler_type"], ("cls", False))
  w = int(b["hidden_size"])
  return dict(tower="hf", width=w, depth=int(b["num_hidden_layers"]), num_heads=int(b["num_attention_heads"]),
              mlp_dim=int(b["intermediate_size"]), context_length=int(b["max_position_embeddings"]),
              vocab_size=int(b["vocab_size"]), layer_norm_eps=float(b["layer_norm_eps"]),
              activation=_BERT_ACTIVATIONS.get(b["hidden_act"], "gelu"), eot_id=-1, pad_id=int(b["pad_token_id"] or 0),
              causal=False, pooling=pooling, mask_padding=False, embed_norm=True, post_ln=True, pooler=pooler,
              type_vocab_size=int(b["type_vocab_size"]), text_length=int(t["context_length"]))


def config_from_open_clip(model_cfg: dict[str, Any], hf_text_config=None) -> dict[str, Any]:
  """Our CLIP family config (``hf_clip``'s shape, with the open_clip options) of an open_clip
  ``model_cfg`` (the dict in ``open_clip_config.json``, or the file / its directory).
  ``hf_text_config``: the BERT config of an HF text tower (see :func:`_bert_config`)."""
  if torch_io.is_path(model_cfg):
    path = torch_io.epath_of(model_cfg)
    model_cfg = json.loads((path / _CONFIG if path.is_dir() else path).read_text())["model_cfg"]
  v = _VISION | (model_cfg.get("vision_cfg") or {})
  t = _TEXT | (model_cfg.get("text_cfg") or {})
  timm, hf = bool(v.get("timm_model_name")), bool(t.get("hf_model_name"))
  bad = [f"{tower}.{k}={c[k]!r}" for tower, c in (("vision_cfg", v), ("text_cfg", t))
         for k, default in _FIXED.items() if c.get(k, default) != default]
  bad += [f"{tower}.norm_kwargs={c['norm_kwargs']!r} (allowed {{'eps': ...}})" for tower, c in (("vision_cfg", v), ("text_cfg", t))
          if set(c.get("norm_kwargs") or {}) - {"eps"}]
  eps = lambda c: float((c.get("norm_kwargs") or {}).get("eps", EPS))
  siglip = model_cfg.get("init_logit_bias") is not None      # open_clip's SigLIP layout
  if not timm and v.get("pool_type", "tok") != "tok":
    bad.append(f"vision_cfg.pool_type={v['pool_type']!r}")
  if not hf and t["pool_type"] not in _POOLS:
    bad.append(f"text_cfg.pool_type={t['pool_type']!r} (allowed {sorted(_POOLS)})")
  act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
  embed_dim = int(model_cfg["embed_dim"])
  if timm:
    vision = _timm_tower(v, bad)
    image_proj = v["timm_proj"] != "none"
    if vision and not image_proj and vision["width"] != embed_dim:
      bad.append(f"vision_cfg.timm_proj='none': the trunk width {vision['width']} must equal embed_dim={embed_dim}")
  else:
    vw, image_proj = int(v["width"]), True
    vision = dict(tower="open_clip", width=vw, depth=int(v["layers"]), num_heads=vw // int(v["head_width"]),
                  mlp_dim=int(vw * v["mlp_ratio"]), patch_size=torch_io.square(v["patch_size"], "patch_size", _WHAT),
                  image_size=torch_io.square(v["image_size"], "image_size", _WHAT), channels=3,
                  layer_norm_eps=eps(v), activation=act, ln_pre=True)
  if hf:
    txt = _hf_tower(t, hf_text_config, bad)
    text_proj = _HF_PROJS.get(t["hf_proj_type"], "linear")
    if txt and text_proj == "none" and txt["width"] != embed_dim:
      bad.append(f"text_cfg.hf_proj_type={t['hf_proj_type']!r}: the BERT width {txt['width']} must equal "
                 f"embed_dim={embed_dim}")
  else:
    tw, text_proj = int(t["width"]), "linear"
    txt = dict(tower="open_clip", width=tw, depth=int(t["layers"]), num_heads=int(t["heads"]),
               mlp_dim=int(tw * t["mlp_ratio"]), context_length=int(t["context_length"]),
               vocab_size=int(t["vocab_size"]), layer_norm_eps=eps(t), activation=act, eot_id=int(t["eos_id"]),
               pad_id=int(t["pad_id"]), causal=not t["no_causal_mask"], pooling=_POOLS.get(t["pool_type"], "argmax"),
               mask_padding=False)
  # CLIP: a class-token trunk, text projection without bias; SigLIP (init_logit_bias): a MAP-pooled
  # timm trunk without projection, open_clip's own bidirectional text tower pooled at the last
  # position with a biased projection.
  map_pool = bool(vision) and not vision.get("class_token", True)
  want = ({"MAP-pooled timm trunk": map_pool, "text_cfg.proj_bias=True": bool(t.get("proj_bias")) and not hf,
           "text_cfg.pool_type='last'": t["pool_type"] == "last" and not hf,
           "text_cfg.no_causal_mask=True": bool(t["no_causal_mask"]) and not hf} if siglip else
          {"a class-token image tower (no MAP pooling)": not map_pool, "text_cfg.proj_bias=False": not t.get("proj_bias")})
  if missing := [k for k, ok in want.items() if not ok and vision is not None]:
    bad.append(f"{'SigLIP (init_logit_bias set)' if siglip else 'CLIP (no init_logit_bias)'} needs "
               f"{', '.join(missing)}")
  if bad:
    raise ValueError(f"unsupported {_WHAT}: {'; '.join(bad)}")
  # CustomTextCLIP (custom_text, or an HF text tower) keeps its text tower under ``text.``
  return dict(kind="siglip" if siglip else "clip", vision=vision, text=txt, embed_dim=embed_dim, image_proj=image_proj,
              text_proj=text_proj, custom_text=bool(model_cfg.get("custom_text")) and not hf)


def _bert_config_dict(t: dict[str, Any]) -> dict[str, Any]:
  """The ``config.json`` of our BERT text tower (``transformers.BertModel``)."""
  return dict(model_type="bert", architectures=["BertModel"], hidden_size=t["width"],
              num_hidden_layers=t["depth"], num_attention_heads=t["num_heads"], intermediate_size=t["mlp_dim"],
              hidden_act=torch_io.invert(_BERT_ACTIVATIONS)[t["activation"]],
              max_position_embeddings=t["context_length"], vocab_size=t["vocab_size"],
              type_vocab_size=t.get("type_vocab_size", 2), layer_norm_eps=t["layer_norm_eps"],
              pad_token_id=t["pad_id"], position_embedding_type="absolute")


def open_clip_config(config, out_dir=None) -> dict[str, Any]:
  """The ``open_clip_config.json`` of our config (what ``open_clip.create_model('local-dir:...')``
  reads). A timm tower / BERT tower is named by the absolute path of ``out_dir/timm_trunk`` /
  ``out_dir/hf_text`` (:func:`export` writes their ``config.json`` there)."""
  cfg = _as_cfg(config)
  v, t = cfg["vision"], cfg["text"]
  out = os.fspath(torch_io.epath_of(out_dir)) if out_dir is not None else "OUT"
  siglip = cfg["kind"] == "siglip"
  if v.get("tower") == "timm":
    vision_cfg = dict(timm_model_name=f"local-dir:{os.path.join(out, _TIMM_DIR)}", timm_model_pretrained=False,
                      timm_pool="map" if siglip else "token",
                      timm_proj="linear" if cfg.get("image_proj", True) else "none", image_size=v["image_size"])
  else:
    vision_cfg = dict(layers=v["depth"], width=v["width"], head_width=v["width"] // v["num_heads"],
                      mlp_ratio=v["mlp_dim"] / v["width"], patch_size=v["patch_size"], image_size=v["image_size"])
  text_proj = cfg.get("text_proj", "linear")
  if t.get("post_ln"):
    pooler = {ours: oc for oc, ours in _HF_POOLERS.items()}[(t["pooling"], t.get("pooler", False))]
    text_cfg = dict(hf_model_name=os.path.join(out, _HF_TEXT_DIR), hf_model_pretrained=False,
                    hf_pooler_type=pooler, hf_proj_type=None if text_proj == "none" else text_proj, context_length=t.get("text_length", t["context_length"]), vocab_size=t["vocab_size"])
  else:
    pool = {ours: oc for oc, ours in _POOLS.items()}[t["pooling"]]
    text_cfg = dict(context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"],
                    heads=t["num_heads"], layers=t["depth"], mlp_ratio=t["mlp_dim"] / t["width"],
                    eos_id=max(t["eot_id"], 0), pad_id=t["pad_id"], pool_type=pool, no_causal_mask=not t["causal"],
                    proj_bias=siglip)
    if t["layer_norm_eps"] != EPS:
      text_cfg["norm_kwargs"] = {"eps": t["layer_norm_eps"]}
  quick = "quick_gelu" in (v["activation"], t["activation"])
  model_cfg = dict(embed_dim=cfg["embed_dim"], quick_gelu=quick, vision_cfg=vision_cfg, text_cfg=text_cfg)
  if cfg.get("custom_text"):
    model_cfg["custom_text"] = True
  if siglip:
    model_cfg["init_logit_bias"] = -10.0
  return dict(model_cfg=model_cfg, preprocess_cfg=dict(mean=[0.48145466, 0.4578275, 0.40821073],
                                                       std=[0.26862954, 0.26130258, 0.27577711]))


def cfg_from_run(config) -> dict[str, Any]:
  """Our config of a CLIP/SigLIP run config in what open_clip expresses: the image tower is
  open_clip's ViT with ``model.ln_pre``, else a timm ViT (SigLIP: MAP-pooled, no class token); the
  text tower a BERT with ``model.text.post_ln``, else open_clip's transformer. One ValueError line
  for the rest."""
  m, t = config.model, text_lib.text_size(config.model.text)
  o, tc = config.objective, config.model.text
  timm, bert = not m.get("ln_pre", False), bool(tc.get("post_ln", False))
  text_proj = m.get("text_proj", "linear")
  image_proj = bool(m.get("image_proj", True))
  siglip = o.get("loss", "clip") == "siglip"
  if timm and siglip:
    v = torch_io.run_vit(config, f"{_WHAT} (SigLIP)", pos_embed=("learned", "sincos2d"), num_registers=(0,),
                         swiglu=(False,), activation=("gelu",), class_token=(False,), layer_norm_eps=(timm_vit.EPS,))
    vis = {k: v[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
                             "ln_pre", "layer_norm_eps", "pos_embed")} | dict(
        tower="timm", timm=True, activation="gelu", layer_scale=bool(v["layer_scale_init"]), class_token=False)
  elif timm:
    vis = timm_vit.cfg_from_run(config) | dict(tower="timm", activation="gelu")
  else:
    v = torch_io.run_vit(config, _WHAT, pos_embed=("learned",), ln_pre=(True,), class_token=(True,),
                         layer_scale_init=(0.0,), num_registers=(0,), swiglu=(False,), layer_norm_eps=(EPS,),
                         activation=("gelu", "quick_gelu"))
    vis = {k: v[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
                             "layer_norm_eps", "activation")} | dict(tower="open_clip", ln_pre=True)
  fields = {"objective.loss": o.get("loss", "clip"), "data.channels": vis["channels"],
            "model.image_pool": m.get("image_pool", "cls"), "model.text_proj_bias": m.get("text_proj_bias", False),
            "model.text.causal": t.causal, "model.text.pooling": t.pooling, "model.text.activation": t.activation,
            "model.text.layer_norm_eps": t.layer_norm_eps, "model.text_proj": text_proj,
            "model.text.embed_norm": bool(tc.get("embed_norm", False)), "model.text.pooler": bool(tc.get("pooler", False))}
  allowed = {"objective.loss": ("clip", "siglip") if timm and not bert else ("clip",), "data.channels": (3,),
             "model.image_pool": ("map",) if siglip else ("cls",), "model.text_proj_bias": (siglip,)}
  if siglip:
    allowed |= {"model.image_proj": (False,), "model.text.causal": (False,), "model.text.pooling": ("last",)}
    fields["model.image_proj"] = image_proj
  if not timm:
    allowed["model.image_proj"] = (True,)
    fields["model.image_proj"] = image_proj
  if bert:
    allowed |= {"model.text.causal": (False,), "model.text.pooling": ("cls", "mean"),
                "model.text.activation": tuple(_BERT_ACTIVATIONS.values()), "model.text.embed_norm": (True,),
                "model.text.pooler": (False,) if t.pooling == "mean" else (False, True)}
  else:
    allowed |= {"model.text.pooling": ("last",) if siglip else tuple(_POOLS.values()),
                "model.text.activation": ("gelu", "quick_gelu") if timm else (vis["activation"],),
                "model.text_proj": ("linear",), "model.text.embed_norm": (False,), "model.text.pooler": (False,)}
  torch_io.check_exportable(fields, allowed, _WHAT)
  tok = tokenizers.from_config(config.data)
  txt = dict(tower="hf" if bert else "open_clip", width=t.width, depth=t.depth, num_heads=t.num_heads,
             mlp_dim=t.mlp_dim, context_length=t.context_length, vocab_size=t.vocab_size,
             layer_norm_eps=t.layer_norm_eps, activation=t.activation, eot_id=tok.eot_id if tok.eot_id is not None else -1,
             pad_id=tok.pad_id, causal=t.causal, pooling=t.pooling, mask_padding=bool(tc.get("mask_padding", True)))
  if bert:
    txt |= dict(embed_norm=True, post_ln=True, pooler=bool(tc.get("pooler", False)), type_vocab_size=2,
                text_length=int(config.data.context_length))
  return dict(kind="siglip" if siglip else "clip", vision=vis, text=txt, embed_dim=int(m.embed_dim),
              image_proj=image_proj, text_proj=text_proj, custom_text=siglip)


def _as_cfg(config, hf_text_config=None) -> dict[str, Any]:
  return torch_io.as_family_cfg(config, "kind", cfg_from_run,
                                lambda c: config_from_open_clip(c, hf_text_config))


def _resblock(hf: str, ours: tuple[str, ...], heads: int) -> list[torch_io.Entry]:
  dense, norm = torch_io.dense_entries, torch_io.norm_entries
  return (norm(f"{hf}.ln_1", (*ours, "norm1")) + norm(f"{hf}.ln_2", (*ours, "norm2"))
          + torch_io.packed_qkv_entries(f"{hf}.attn.in_proj_weight", f"{hf}.attn.in_proj_bias", (*ours, "attn"), heads)
          + torch_io.out_entries(f"{hf}.attn.out_proj", (*ours, "attn", "out"), heads)
          + dense(f"{hf}.mlp.c_fc", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.c_proj", (*ours, "mlp", "fc2")))


# BERT (transformers BertModel) attention names -> the q_proj/k_proj/v_proj/o_proj ones of
# torch_io.attention_entries (and back on export)
_BERT_RENAMES = ((".attention.self.query.", ".attention.q_proj."), (".attention.self.key.", ".attention.k_proj."),
                 (".attention.self.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj."))
_BERT_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _bert_mapping(t: dict[str, Any], p: str = "text.transformer.") -> list[torch_io.Entry]:
  """A BertModel under ``p`` (attention renamed, :data:`_BERT_RENAMES`) <-> our post-LN text tower."""
  dense, norm, entry = torch_io.dense_entries, torch_io.norm_entries, torch_io.entry
  types = int(t.get("type_vocab_size", 2))
  m = [entry(f"{p}embeddings.word_embeddings.weight", ("text", "token_embed")),
       torch_io.Entry((f"{p}embeddings.position_embeddings.weight", f"{p}embeddings.token_type_embeddings.weight"),
                      (("text", "pos_embed"),), lambda pos, tt: (pos + tt[0],),
                      lambda pos: (pos, np.zeros((types, pos.shape[-1]), np.float32)))]
  m += norm(f"{p}embeddings.LayerNorm", ("text", "embed_norm"))
  for i in range(t["depth"]):
    hf, ours = f"{p}encoder.layer.{i}", ("text", "encoder", f"layer_{i}")
    m += (torch_io.attention_entries(f"{hf}.attention", (*ours, "attn"), t["num_heads"])
          + norm(f"{hf}.attention.output.LayerNorm", (*ours, "norm1"))
          + dense(f"{hf}.intermediate.dense", (*ours, "mlp", "fc1")) + dense(f"{hf}.output.dense", (*ours, "mlp", "fc2"))
          + norm(f"{hf}.output.LayerNorm", (*ours, "norm2")))
  if t.get("pooler"):
    m += dense(f"{p}pooler.dense", ("text", "pooler"))
  return m


def _mapping(cfg: dict[str, Any]) -> list[torch_io.Entry]:
  v, t, entry, norm = cfg["vision"], cfg["text"], torch_io.entry, torch_io.norm_entries
  scalar = lambda x: x.reshape(())
  m = [entry(name, (name,), scalar, scalar) for name in ("logit_scale", "logit_bias")[:2 if cfg["kind"] == "siglip" else 1]]
  if v.get("tower") == "timm":
    m += timm_vit.mapping(v, "visual.trunk.", ("image",))
    if not v.get("class_token", True):
      m += _map_head_mapping("visual.trunk.attn_pool", v["num_heads"])
    if cfg.get("image_proj", True):
      m.append(entry("visual.head.proj.weight", ("image_projection", "kernel"), torch_io.transpose, torch_io.transpose))
  else:
    m += [torch_io.fold_cls_position("visual.class_embedding", "visual.positional_embedding", ("image",),
                                     flat_cls=True, bias_free=True),
          entry("visual.conv1.weight", ("image", "patch_embed", "proj", "kernel"), torch_io.patch_kernel,
                functools.partial(torch_io.patch_kernel_to_torch, patch=v["patch_size"], channels=v["channels"])),
          entry("visual.proj", ("image_projection", "kernel"))]
    m += norm("visual.ln_pre", ("image", "ln_pre")) + norm("visual.ln_post", ("image", "norm"))
    for i in range(v["depth"]):
      m += _resblock(f"visual.transformer.resblocks.{i}", ("image", "encoder", f"layer_{i}"), v["num_heads"])
  if t.get("post_ln"):
    m += _bert_mapping(t)
    proj, linear = cfg.get("text_proj", "linear"), (torch_io.transpose, torch_io.transpose)
    if proj == "linear":
      m.append(entry("text.proj.weight", ("text_projection", "kernel"), *linear))
    elif proj == "mlp":
      m += [entry("text.proj.0.weight", ("text_projection", "fc1", "kernel"), *linear),
            entry("text.proj.2.weight", ("text_projection", "fc2", "kernel"), *linear)]
  else:
    p = "text." if cfg.get("custom_text") else ""
    if cfg["kind"] == "siglip":   # an nn.Linear with bias
      m += torch_io.dense_entries(f"{p}text_projection", ("text_projection",))
    else:
      m.append(entry(f"{p}text_projection", ("text_projection", "kernel")))
    m += [entry(f"{p}token_embedding.weight", ("text", "token_embed")),
          entry(f"{p}positional_embedding", ("text", "pos_embed"))]
    m += norm(f"{p}ln_final", ("text", "norm"))
    for i in range(t["depth"]):
      m += _resblock(f"{p}transformer.resblocks.{i}", ("text", "encoder", f"layer_{i}"), t["num_heads"])
  return m


def _map_head_mapping(hf: str, heads: int) -> list[torch_io.Entry]:
  """timm ``AttentionPoolLatent`` (latent, q, packed kv, proj, norm, mlp) <-> our ``map_head``."""
  ours, dense = ("map_head",), torch_io.dense_entries
  kv_kernel = lambda w: tuple(torch_io.qkv_kernel(x, heads) for x in np.split(w, 2, axis=0))
  return ([torch_io.entry(f"{hf}.latent", (*ours, "probe")),
           torch_io.entry(f"{hf}.q.weight", (*ours, "query", "kernel"), lambda w: torch_io.qkv_kernel(w, heads),
                          lambda k: torch_io.qkv_kernel_to_torch(k, heads)),
           torch_io.entry(f"{hf}.q.bias", (*ours, "query", "bias"), lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1)),
           torch_io.Entry((f"{hf}.kv.weight",), ((*ours, "key", "kernel"), (*ours, "value", "kernel")), kv_kernel,
                          lambda *ks: (np.concatenate([torch_io.qkv_kernel_to_torch(k, heads) for k in ks]),)),
           torch_io.Entry((f"{hf}.kv.bias",), ((*ours, "key", "bias"), (*ours, "value", "bias")),
                          lambda b: tuple(x.reshape(heads, -1) for x in np.split(b, 2)),
                          lambda *bs: (np.concatenate([b.reshape(-1) for b in bs]),))]
          + torch_io.out_entries(f"{hf}.proj", (*ours, "out"), heads) + torch_io.norm_entries(f"{hf}.norm", (*ours, "norm"))
          + dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2")))


def _normalize(sd: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
  """Buffers dropped, BERT attention renamed, the patch-bias placeholder where the tower has none."""
  out = {}
  for k, x in sd.items():
    if k.split(".")[-1] == "attn_mask" or k.endswith(_BERT_BUFFERS):
      continue
    if k.startswith("text.transformer."):
      for a, b in _BERT_RENAMES:
        k = k.replace(a, b)
    out[k] = x
  v = cfg["vision"]
  if v.get("tower") != "timm" or v.get("ln_pre"):
    out[torch_io.NO_PATCH_BIAS] = np.zeros((v["width"],), np.float32)
  return out


def _denormalize(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, x in sd.items():
    if k.startswith("text.transformer."):
      for a, b in _BERT_RENAMES:
        k = k.replace(b, a)
    out[k] = x
  return out


def _read(source, model_cfg) -> tuple[dict[str, np.ndarray], Any]:
  """(state dict, model_cfg) of a directory (``open_clip_config.json`` + weights), a weights file,
  a state dict or a module (then ``model_cfg`` is needed)."""
  if torch_io.is_path(source) and torch_io.epath_of(source).is_dir():
    folder = torch_io.epath_of(source)
    model_cfg = model_cfg or folder / _CONFIG
    names = [n for n in _WEIGHTS if (folder / n).is_file()]
    if not names:
      raise ValueError(f"{_WHAT}: {os.fspath(source)!r} holds none of {', '.join(_WEIGHTS)}")
    source = folder / names[0]
  elif torch_io.is_path(source) and model_cfg is None:
    model_cfg = torch_io.beside(source, _CONFIG)
  if model_cfg is None:
    raise ValueError(f"{_WHAT}: pass model_cfg= (the open_clip model config dict or open_clip_config.json)")
  return torch_io.as_numpy_state_dict(source), model_cfg


def config_overrides(config) -> dict[str, Any]:
  """The run-config fields that make ``configs/clip.py`` build this model (``hf_clip``'s)."""
  return hf_clip.config_overrides(_as_cfg(config))


def load(source, model_cfg=None, scan: bool = False,
         hf_text_config=None) -> tuple[clip_model.ImageTextModel, dict, dict]:
  """``(module, params, config_overrides)`` from an open_clip directory, weights file, state dict or
  module (with ``model_cfg``: the dict, ``open_clip_config.json`` or its directory).
  ``hf_text_config``: an HF text tower's BERT config when ``text_cfg.hf_model_name`` is neither a
  local directory nor in the HF cache. One ValueError lists every unused, missing or mis-shaped
  tensor."""
  sd, model_cfg = _read(source, model_cfg)
  cfg = _as_cfg(model_cfg, hf_text_config)
  flat = torch_io.convert_with_mapping(_normalize(sd, cfg), _mapping(cfg), hf_clip.expected_shapes(cfg),
                                       f"convert ({_WHAT})")
  return hf_clip.build_model(cfg, scan), torch_io.to_param_tree(flat, scan), config_overrides(cfg)


def export(params: dict, config, out_dir) -> str:
  """Writes ``open_clip_config.json`` + ``open_clip_model.safetensors`` that
  ``open_clip.create_model('local-dir:OUT')`` loads, and the ``config.json`` of a timm tower
  (``OUT/timm_trunk``) or BERT tower (``OUT/hf_text``) that it names. ``config``: an open_clip
  model_cfg / ``open_clip_config.json`` / its directory, our config, or a CLIP run config."""
  cfg = _as_cfg(config)
  flat, v = torch_io.from_param_tree(params), cfg["vision"]
  if v.get("pos_embed") == "sincos2d":   # a run's fixed positions: the learned ones they equal
    g = v["image_size"] // v["patch_size"]
    flat[("image", "pos_embed")] = layers.sincos_2d(v["width"], g, g)[None]
  sd = torch_io.export_with_mapping(flat, _mapping(cfg), f"export ({_WHAT})")
  out = torch_io.write_hf(out_dir, _denormalize(sd), open_clip_config(cfg, out_dir), _CONFIG, _WEIGHTS[0])
  folder = torch_io.epath_of(out)
  if cfg["vision"].get("tower") == "timm":
    _write_json(folder / _TIMM_DIR, timm_vit.timm_config_dict(cfg["vision"]))
  if cfg["text"].get("post_ln"):
    _write_json(folder / _HF_TEXT_DIR, _bert_config_dict(cfg["text"]))
  return out


def _write_json(folder, value: dict[str, Any]) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(value, indent=2, sort_keys=True))
