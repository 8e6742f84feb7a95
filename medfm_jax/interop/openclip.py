"""open_clip ``CLIP`` (the standard layout: open_clip's own ViT image tower and text transformer)
<-> our :class:`~medfm_jax.models.clip.ImageTextModel`.

Usage (offline; an open_clip Hub snapshot directory holding ``open_clip_config.json`` and
``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, a state dict with its
``model_cfg``, or an ``open_clip.model.CLIP`` module with its ``model_cfg``)::

    from medfm_jax.interop import openclip
    model, params, overrides = openclip.load("/ckpts/openclip-vit-b-16")
    img, txt = model.apply({"params": params}, images, tokens)   # NHWC; open_clip's tokenizer ids
    openclip.export(params, "/ckpts/openclip-vit-b-16", "/out/clip")  # open_clip.create_model("local-dir:/out/clip")

Equivalences (float32 parity <= 1e-5 in tests/interop/test_openclip_parity.py): ``class_embedding``
+ its position folded into our cls token; ``conv1`` has no bias (ours: zeros; export folds ours into
the patch positions); ``ln_post`` = our final norm (applied to every token, the cls row is the same);
``proj`` / ``text_projection`` are ``[in, out]`` matrices = our kernels; packed ``in_proj`` q/k/v;
text pooled at the largest id (``pool_type='argmax'``), the first ``eos_id`` (``'eos'``) or the last
position (``'last'``), causal attention, no padding mask; LayerNorm eps 1e-5; QuickGELU when
``quick_gelu``. Not supported (one-line error): timm image towers and HF text towers (BiomedCLIP:
its PubMedBERT tower is post-LN, ours pre-LN; import its image tower with ``timm_vit`` under the
``visual.trunk.`` prefix), LayerScale, attentional pooling, q/k norm and the other block options.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np

from medfm_jax.interop import hf_clip, torch_io
from medfm_jax.models import clip as clip_model

__all__ = ["load", "export", "config_from_open_clip", "open_clip_config", "config_overrides", "cfg_from_run"]

_WHAT = "open_clip CLIP"
_CONFIG = "open_clip_config.json"
_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
EPS = 1e-5
# open_clip CLIPVisionCfg / CLIPTextCfg defaults of the fields read here, and the fields whose
# non-default values (or presence) we cannot express.
_VISION = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224)
_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0, pad_id=0,
             eos_id=2, pool_type="argmax", no_causal_mask=False)
_FIXED = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False, final_ln_after_pool=False,
              act_kwargs=None, norm_kwargs=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
              scale_attn_inner=False, scale_attn=False, scale_fc=False, timm_model_name=None, hf_model_name=None,
              embed_cls=False, proj_bias=False, block_type=None)
_POOLS = {"argmax": "argmax", "eos": "eot", "last": "last"}


def config_from_open_clip(model_cfg: dict[str, Any]) -> dict[str, Any]:
  """Our CLIP family config (``hf_clip``'s shape) of an open_clip ``model_cfg`` (the dict in
  ``open_clip_config.json``, or the file / its directory)."""
  if isinstance(model_cfg, (str, os.PathLike)):
    path = os.fspath(model_cfg)
    path = os.path.join(path, _CONFIG) if os.path.isdir(path) else path
    with open(path) as f:
      model_cfg = json.load(f)["model_cfg"]
  v = _VISION | (model_cfg.get("vision_cfg") or {})
  t = _TEXT | (model_cfg.get("text_cfg") or {})
  bad = [f"{tower}.{k}={c[k]!r}" for tower, c in (("vision_cfg", v), ("text_cfg", t))
         for k, default in _FIXED.items() if c.get(k, default) != default]
  if v.get("pool_type", "tok") != "tok":
    bad.append(f"vision_cfg.pool_type={v['pool_type']!r}")
  if t["pool_type"] not in _POOLS:
    bad.append(f"text_cfg.pool_type={t['pool_type']!r} (allowed {sorted(_POOLS)})")
  if bad:
    raise ValueError(f"unsupported {_WHAT}: {'; '.join(bad)}")
  act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
  vw = int(v["width"])
  vision = dict(width=vw, depth=int(v["layers"]), num_heads=vw // int(v["head_width"]),
                mlp_dim=int(vw * v["mlp_ratio"]), patch_size=torch_io.square(v["patch_size"], "patch_size", _WHAT),
                image_size=torch_io.square(v["image_size"], "image_size", _WHAT), channels=3, layer_norm_eps=EPS,
                activation=act)
  tw = int(t["width"])
  text = dict(width=tw, depth=int(t["layers"]), num_heads=int(t["heads"]), mlp_dim=int(tw * t["mlp_ratio"]),
              context_length=int(t["context_length"]), vocab_size=int(t["vocab_size"]), layer_norm_eps=EPS,
              activation=act, eot_id=int(t["eos_id"]), pad_id=int(t["pad_id"]), causal=not t["no_causal_mask"],
              pooling=_POOLS[t["pool_type"]], mask_padding=False)
  return dict(kind="clip", vision=vision, text=text, embed_dim=int(model_cfg["embed_dim"]))


def open_clip_config(config) -> dict[str, Any]:
  """The ``open_clip_config.json`` of our config (what ``open_clip.create_model('local-dir:...')``
  reads)."""
  cfg = _as_cfg(config)
  v, t = cfg["vision"], cfg["text"]
  pool = {ours: oc for oc, ours in _POOLS.items()}[t["pooling"]]
  model_cfg = dict(
      embed_dim=cfg["embed_dim"], quick_gelu=v["activation"] == "quick_gelu",
      vision_cfg=dict(layers=v["depth"], width=v["width"], head_width=v["width"] // v["num_heads"],
                      mlp_ratio=v["mlp_dim"] / v["width"], patch_size=v["patch_size"], image_size=v["image_size"]),
      text_cfg=dict(context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"],
                    heads=t["num_heads"], layers=t["depth"], mlp_ratio=t["mlp_dim"] / t["width"],
                    eos_id=max(t["eot_id"], 0), pad_id=t["pad_id"], pool_type=pool,
                    no_causal_mask=not t["causal"]))
  return dict(model_cfg=model_cfg, preprocess_cfg=dict(mean=[0.48145466, 0.4578275, 0.40821073],
                                                       std=[0.26862954, 0.26130258, 0.27577711]))


def cfg_from_run(config) -> dict[str, Any]:
  """Our config of a CLIP run config (``hf_clip.cfg_from_run``) in what open_clip's standard CLIP
  expresses; one ValueError line otherwise."""
  cfg = hf_clip.cfg_from_run(config)
  v, t = cfg["vision"], cfg["text"]
  torch_io.check_exportable(
      {"objective.loss": cfg["kind"], "data.channels": v["channels"], "model.layer_norm_eps": v["layer_norm_eps"],
       "model.text.layer_norm_eps": t["layer_norm_eps"], "model.activation": v["activation"],
       "model.text.activation": t["activation"]},
      {"objective.loss": ("clip",), "data.channels": (3,), "model.layer_norm_eps": (EPS,),
       "model.text.layer_norm_eps": (EPS,), "model.activation": ("gelu", "quick_gelu"),
       "model.text.activation": (v["activation"],)}, _WHAT)
  return cfg


def _as_cfg(config) -> dict[str, Any]:
  return torch_io.as_family_cfg(config, "kind", cfg_from_run, config_from_open_clip)


def _resblock(hf: str, ours: tuple[str, ...], heads: int) -> list[torch_io.Entry]:
  dense, norm = torch_io.dense_entries, torch_io.norm_entries
  return (norm(f"{hf}.ln_1", (*ours, "norm1")) + norm(f"{hf}.ln_2", (*ours, "norm2"))
          + torch_io.packed_qkv_entries(f"{hf}.attn.in_proj_weight", f"{hf}.attn.in_proj_bias", (*ours, "attn"), heads)
          + torch_io.out_entries(f"{hf}.attn.out_proj", (*ours, "attn", "out"), heads)
          + dense(f"{hf}.mlp.c_fc", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.c_proj", (*ours, "mlp", "fc2")))


def _mapping(cfg: dict[str, Any]) -> list[torch_io.Entry]:
  v, t, entry, norm = cfg["vision"], cfg["text"], torch_io.entry, torch_io.norm_entries
  scalar = lambda x: x.reshape(())
  m = [torch_io.fold_cls_position("visual.class_embedding", "visual.positional_embedding", ("image",),
                                  flat_cls=True, bias_free=True),
       entry("visual.conv1.weight", ("image", "patch_embed", "proj", "kernel"), torch_io.patch_kernel,
             functools.partial(torch_io.patch_kernel_to_torch, patch=v["patch_size"], channels=v["channels"])),
       entry("visual.proj", ("image_projection", "kernel")), entry("text_projection", ("text_projection", "kernel")),
       entry("token_embedding.weight", ("text", "token_embed")), entry("positional_embedding", ("text", "pos_embed")),
       entry("logit_scale", ("logit_scale",), scalar, scalar)]
  m += norm("visual.ln_pre", ("image", "ln_pre")) + norm("visual.ln_post", ("image", "norm"))
  m += norm("ln_final", ("text", "norm"))
  for i in range(v["depth"]):
    m += _resblock(f"visual.transformer.resblocks.{i}", ("image", "encoder", f"layer_{i}"), v["num_heads"])
  for i in range(t["depth"]):
    m += _resblock(f"transformer.resblocks.{i}", ("text", "encoder", f"layer_{i}"), t["num_heads"])
  return m


def _read(source, model_cfg) -> tuple[dict[str, np.ndarray], Any]:
  """(state dict, model_cfg) of a directory (``open_clip_config.json`` + weights), a weights file,
  a state dict or a module (then ``model_cfg`` is needed)."""
  if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
    model_cfg = model_cfg or os.path.join(source, _CONFIG)
    names = [n for n in _WEIGHTS if os.path.isfile(os.path.join(source, n))]
    if not names:
      raise ValueError(f"{_WHAT}: {os.fspath(source)!r} holds none of {', '.join(_WEIGHTS)}")
    source = os.path.join(source, names[0])
  elif isinstance(source, (str, os.PathLike)) and model_cfg is None:
    model_cfg = os.path.join(os.path.dirname(os.fspath(source)), _CONFIG)
  if model_cfg is None:
    raise ValueError(f"{_WHAT}: pass model_cfg= (the open_clip model config dict or open_clip_config.json)")
  return torch_io.as_numpy_state_dict(source), model_cfg


def config_overrides(config) -> dict[str, Any]:
  """The run-config fields that make ``configs/clip.py`` build this model (``hf_clip``'s)."""
  return hf_clip.config_overrides(_as_cfg(config))


def load(source, model_cfg=None, scan: bool = False) -> tuple[clip_model.ImageTextModel, dict, dict]:
  """``(module, params, config_overrides)`` from an open_clip directory, weights file, state dict or
  module (with ``model_cfg``: the dict, ``open_clip_config.json`` or its directory). One
  ValueError lists every unused, missing or mis-shaped tensor."""
  sd, model_cfg = _read(source, model_cfg)
  cfg = _as_cfg(model_cfg)
  sd = {k: v for k, v in sd.items() if k != "attn_mask"} | {torch_io.NO_PATCH_BIAS: np.zeros(cfg["vision"]["width"])}
  flat = torch_io.convert_with_mapping(sd, _mapping(cfg), hf_clip.expected_shapes(cfg), f"convert ({_WHAT})")
  return hf_clip.build_model(cfg, scan), torch_io.to_param_tree(flat, scan), config_overrides(cfg)


def export(params: dict, config, out_dir) -> str:
  """Writes ``open_clip_config.json`` + ``open_clip_model.safetensors`` that
  ``open_clip.create_model('local-dir:OUT')`` loads. ``config``: an open_clip model_cfg /
  ``open_clip_config.json`` / its directory, our config, or a CLIP run config."""
  cfg = _as_cfg(config)
  sd = torch_io.export_with_mapping(torch_io.from_param_tree(params), _mapping(cfg), f"export ({_WHAT})")
  return torch_io.write_hf(out_dir, sd, open_clip_config(cfg), _CONFIG, _WEIGHTS[0])

