"""Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` <-> our ``VisionTransformer``.

Usage (offline; a Hub snapshot directory holding ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``, e.g. ``facebook/dinov2-small`` or ``facebook/dinov2-with-registers-base``
downloaded beforehand; their ``config.json`` says ``image_size=518``)::

    from medfm_jax.interop import hf_dinov2
    model, params, overrides = hf_dinov2.load("/ckpts/dinov2-small", image_size=224)
    tokens = model.apply({"params": params}, images)   # images [b, 224, 224, 3] (NHWC, HF-normalised)
    cls = tokens[:, 0]              # = HF pooler_output; tokens = HF last_hidden_state
    # Big models: scanned encoder, bfloat16 compute; fields for our configs (e.g. a DINO run):
    model, params, overrides = hf_dinov2.load("/ckpts/dinov2-giant", scan=True, dtype=jnp.bfloat16)
    # overrides: the fields for our configs, {"model.width": 1536, ..., "data.image_size": 518}

Equivalences (exact, float32 parity <= 1e-5 in tests/interop/test_hf_dinov2_parity.py):

* HF adds ``position_embeddings[:, 0]`` to the cls token; we fold it into ``cls_token`` (both are
  added before any other op, and HF never resamples the cls position, so this is exact at every
  resolution). Export writes the folded token to ``cls_token`` and zeros to the cls position.
* Registers (``Dinov2WithRegistersModel``) are inserted after pos-embedding, between cls and
  patches, with no position embedding: our ``registers`` prefix tokens.
* ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}/gamma``; SwiGLU ``gate_proj``/``up_proj`` (transformers
  4.x: one packed ``weights_in``, chunked gate-first) -> ``mlp/w12`` ``[embed, 2, hidden]`` with
  ``silu(gate) * up``; hidden size ``((int(width * mlp_ratio * 2/3) + 7) // 8) * 8``.
* ``mask_token`` ``[1, D]`` -> our ``mask_token`` ``[1, 1, D]`` (``mask_token=True``); HF's
  ``bool_masked_pos`` = our ``patch_mask`` (both replace patch embeddings before position
  embeddings). Exporting params without a mask token writes zeros (HF's init).
* Resolution: HF resamples the patch position grid bicubically at run time (``Dinov2Model``: torch
  bicubic, a=-0.75, no antialias; ``Dinov2WithRegistersModel``: antialiased, PIL-style a=-0.5).
  ``image_size=`` resamples it once at import with HF's exact rule (:func:`hf_resize_pos_grid`),
  so our model at that size matches HF run at that size. Our own run-time resampling
  (``jax.image.resize`` bicubic, a=-0.5, antialiased) equals ``Dinov2WithRegistersModel``'s but
  not ``Dinov2Model``'s (random ViT-S/14 built at 224, run at 448: max |diff| 1.6e-2 in
  last_hidden_state vs 3e-6 when imported at 448), so import at the resolution you run.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medfm_jax.interop import torch_io
from medfm_jax.models import layers, vit

__all__ = ["config_from_hf", "vit_kwargs", "config_overrides", "build_vit", "normalize_hf_names", "convert_dinov2",
           "export_dinov2", "load", "export", "hf_config_dict", "cfg_from_run", "hf_resize_pos_grid", "swiglu_hidden"]

_WHAT = "HF Dinov2"
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                    hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3,
                    qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=True)
# HF hidden_act -> our activation name
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu"}
# transformers 4.x (Hub checkpoint) name -> current name
_LEGACY_RENAMES = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
)
_TASK_PREFIXES = ("dinov2.", "dinov2_with_registers.")


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
  """HF/DINOv2 SwiGLU hidden size: two thirds of ``width * mlp_ratio``, rounded up to a multiple of 8."""
  return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def config_from_hf(hf_config, image_size: int | None = None) -> dict[str, Any]:
  """Our hyperparameters from a ``Dinov2Config`` / ``Dinov2WithRegistersConfig``, its dict, or a
  ``config.json`` path / directory. ``image_size``: the resolution our model is built for
  (default: HF's ``image_size``)."""
  raw = torch_io.read_hf_config(hf_config, _WHAT)
  c = {k: raw.get(k, v) for k, v in _HF_DEFAULTS.items()}
  registers = raw.get("model_type") == "dinov2_with_registers" or "num_register_tokens" in raw
  width, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
  swiglu = bool(c["use_swiglu_ffn"])
  hf_image = torch_io.square(c["image_size"], "image_size", _WHAT)
  cfg = dict(width=width, depth=int(c["num_hidden_layers"]), num_heads=heads,
             mlp_dim=swiglu_hidden(width, c["mlp_ratio"]) if swiglu else int(width * c["mlp_ratio"]),
             patch_size=torch_io.square(c["patch_size"], "patch_size", _WHAT), hf_image_size=hf_image,
             image_size=int(image_size or hf_image), channels=int(c["num_channels"]),
             layer_norm_eps=float(c["layer_norm_eps"]), hidden_act=c["hidden_act"], qkv_bias=bool(c["qkv_bias"]),
             layerscale_value=float(c["layerscale_value"]), swiglu=swiglu, registers=registers,
             num_registers=int(raw.get("num_register_tokens", 0) or 0),
             mask_token=registers or bool(c["use_mask_token"]), head_dim=raw.get("head_dim"),
             mlp_ratio=c["mlp_ratio"], pos_embed="learned")
  _check_supported(cfg)
  return cfg


def _check_supported(cfg: dict[str, Any]) -> None:
  problems = []
  if cfg["hidden_act"] not in _ACTIVATIONS:
    problems.append(f"hidden_act={cfg['hidden_act']!r} (allowed {sorted(_ACTIVATIONS)})")
  if cfg["head_dim"] not in (None, cfg["width"] // cfg["num_heads"]):
    problems.append(f"head_dim={cfg['head_dim']} (only hidden_size // num_attention_heads)")
  for key in ("hf_image_size", "image_size"):
    if cfg[key] % cfg["patch_size"]:
      problems.append(f"{key}={cfg[key]} not divisible by patch_size={cfg['patch_size']}")
  if problems:
    raise ValueError(f"unsupported {_WHAT} config: " + "; ".join(problems))


def _mlp_ratio(width: int, mlp_dim: int, swiglu: bool) -> int:
  """HF's (integer) ``mlp_ratio`` giving ``mlp_dim``; one ValueError line when none does."""
  for r in range(1, 17):
    if (swiglu_hidden(width, r) if swiglu else width * r) == mlp_dim:
      return r
  raise ValueError(f"cannot export to {_WHAT}: model.mlp_dim={mlp_dim} is no {'SwiGLU ' if swiglu else ''}"
                   f"hidden size HF derives from width {width} and an integer mlp_ratio")


def cfg_from_run(config) -> dict[str, Any]:
  """Our DINOv2 config of a run config's image encoder (DINO teacher, a fine-tuned backbone); one
  ValueError line for what ``Dinov2Model`` cannot express. Fixed sin-cos positions are exported as
  the learned ones they equal at the run's image size; no LayerScale is exported as LayerScale 1."""
  v = torch_io.run_vit(config, _WHAT, ln_pre=(False,), class_token=(True,),
                       activation=tuple(_ACTIVATIONS.values()))
  ratio = _mlp_ratio(v["width"], v["mlp_dim"], v["swiglu"])
  cfg = {k: v[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
                           "layer_norm_eps", "swiglu", "num_registers")}
  return cfg | dict(hf_image_size=v["image_size"], hidden_act=torch_io.invert(_ACTIVATIONS)[v["activation"]],
                    qkv_bias=True, layerscale_value=float(v["layer_scale_init"]) or 1.0, mlp_ratio=ratio,
                    registers=v["num_registers"] > 0, mask_token=True, head_dim=None,
                    pos_embed=v["pos_embed"])


def _as_cfg(config, image_size: int | None = None) -> dict[str, Any]:
  """Our DINOv2 config from itself, an HF config (object, dict, path) or a run config, built for
  ``image_size`` (default: the source's)."""
  cfg = dict(torch_io.as_family_cfg(config, "hf_image_size", cfg_from_run,
                                    lambda c: config_from_hf(c, image_size)))
  if image_size:
    cfg["image_size"] = int(image_size)
  _check_supported(cfg)
  return cfg


def vit_kwargs(hf_config, image_size: int | None = None) -> dict[str, Any]:
  """``VisionTransformer`` keyword arguments for the HF model at ``image_size`` (default HF's)."""
  cfg = _as_cfg(hf_config, image_size)
  return dict(variant=torch_io.variant_name(cfg["width"], cfg["depth"], cfg["num_heads"], cfg["mlp_dim"],
                                            cfg["patch_size"]),
              width=cfg["width"], depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
              image_size=cfg["image_size"], pos_embed="learned", layer_norm_eps=cfg["layer_norm_eps"],
              # LayerScale is always on in DINOv2; its init value is irrelevant once weights are loaded.
              layer_scale_init=cfg["layerscale_value"] or 1.0, num_registers=cfg["num_registers"],
              activation=_ACTIVATIONS[cfg["hidden_act"]], swiglu=cfg["swiglu"], qkv_bias=cfg["qkv_bias"],
              mask_token=cfg["mask_token"], final_norm=True)


_CONFIG_FIELDS = ("variant", "width", "depth", "num_heads", "mlp_dim", "pos_embed", "layer_norm_eps",
                  "layer_scale_init", "num_registers", "activation", "swiglu", "mask_token")


def config_overrides(hf_config, image_size: int | None = None) -> dict[str, Any]:
  """``{"model.variant": ..., "data.image_size": ...}``: the config fields that make
  ``vit.vit_from_config`` build the same encoder as :func:`build_vit` (e.g. to start a DINO run from
  HF weights). Raises for ``qkv_bias=False``, which our configs cannot express."""
  kw = vit_kwargs(hf_config, image_size)
  if not kw["qkv_bias"]:
    raise ValueError(f"{_WHAT} qkv_bias=False: our configs always build q/k/v biases; use build_vit")
  return torch_io.vit_run_fields(**{k: kw[k] for k in _CONFIG_FIELDS}) | {
      "data.image_size": kw["image_size"], "data.channels": _as_cfg(hf_config)["channels"]}


def build_vit(hf_config, scan: bool = False, image_size: int | None = None, **overrides) -> vit.VisionTransformer:
  """Our ``VisionTransformer`` for the HF model; ``overrides`` (dtype, remat, attention_impl, ...)
  go to the constructor."""
  return vit.VisionTransformer(**(vit_kwargs(hf_config, image_size) | {"scan": scan} | overrides))


def normalize_hf_names(state_dict: dict[str, Any]) -> dict[str, Any]:
  """transformers 4.x names -> current ones (packed SwiGLU ``weights_in`` is split gate-first);
  a task model's ``dinov2.`` / ``dinov2_with_registers.`` prefix is stripped and its head dropped."""
  for prefix in _TASK_PREFIXES:
    if f"{prefix}embeddings.cls_token" in state_dict:
      state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
      break
  out = {}
  for name, value in state_dict.items():
    new = name
    for pattern, repl in _LEGACY_RENAMES:
      new = re.sub(pattern, repl, new)
    if m := re.fullmatch(r"(.*\.mlp\.)weights_in\.(weight|bias)", new):
      value = np.asarray(value)
      half = value.shape[0] // 2
      parts = {f"{m[1]}gate_proj.{m[2]}": value[:half], f"{m[1]}up_proj.{m[2]}": value[half:]}
    else:
      parts = {new: value}
    for key, v in parts.items():
      if key in out:
        raise ValueError(f"state dict holds both {name!r} and a tensor that is also named {key!r}")
      out[key] = v
  return out


# ---------------------------------------------------------------------------------------------
# position embeddings: HF's run-time bicubic resampling, reproduced in numpy (float64)

def _cubic(x, a):
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


def _torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``F.interpolate(mode='bicubic', align_corners=False, size=n_out)`` as an ``[n_out, n_in]`` matrix
  (Keys a=-0.75, border indices clamped)."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  x0 = np.floor(src)
  t = src - x0
  m = np.zeros((n_out, n_in))
  for off in (-1, 0, 1, 2):
    idx = np.clip(x0 + off, 0, n_in - 1).astype(int)
    np.add.at(m, (np.arange(n_out), idx), _cubic(t - off, -0.75))
  return m


def _torch_bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``F.interpolate(mode='bicubic', antialias=True, align_corners=False, size=n_out)``: PIL-style
  a=-0.5 kernel widened by the downscale factor, weights normalised per output."""
  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) * inv, -0.5)
    m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  return m


def hf_resize_pos_grid(grid: np.ndarray, new_hw: tuple[int, int], antialias: bool) -> np.ndarray:
  """Patch position grid ``[h, w, d]`` -> ``[new_h, new_w, d]`` exactly as HF resamples it at run
  time (``antialias=False``: ``Dinov2Model``; ``True``: ``Dinov2WithRegistersModel``)."""
  h, w, _ = grid.shape
  if (h, w) == tuple(new_hw):
    return np.asarray(grid, np.float32)
  make = _torch_bicubic_aa_matrix if antialias else _torch_bicubic_matrix
  out = np.einsum("Hh,Ww,hwd->HWd", make(h, new_hw[0]), make(w, new_hw[1]), np.asarray(grid, np.float64))
  return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# name/layout mapping (torch_io.Entry list)

def _pos_entry(cfg: dict[str, Any]) -> torch_io.Entry:
  g0, g = cfg["hf_image_size"] // cfg["patch_size"], cfg["image_size"] // cfg["patch_size"]

  def to_ours(cls, pos):
    grid = hf_resize_pos_grid(pos[0, 1:].reshape(g0, g0, -1), (g, g), antialias=cfg["registers"])
    return cls + pos[:, :1], grid.reshape(1, g * g, -1)

  def to_hf(cls, pos):
    return cls, np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)

  return torch_io.Entry(("embeddings.cls_token", "embeddings.position_embeddings"),
                        (("cls_token",), ("pos_embed",)), to_ours, to_hf)


def _swiglu_entries(hf: str, ours: tuple[str, ...]) -> list[torch_io.Entry]:
  pack_w = lambda gate, up: (np.stack([gate.T, up.T], axis=1),)     # [embed, 2, hidden]
  unpack_w = lambda k: (torch_io.transpose(k[:, 0]), torch_io.transpose(k[:, 1]))
  pack_b = lambda gate, up: (np.stack([gate, up]),)                   # [2, hidden]
  unpack_b = lambda b: (b[0], b[1])
  return [torch_io.Entry((f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), ((*ours, "w12", "kernel"),),
                         pack_w, unpack_w),
          torch_io.Entry((f"{hf}.gate_proj.bias", f"{hf}.up_proj.bias"), ((*ours, "w12", "bias"),),
                         pack_b, unpack_b)] + torch_io.dense_entries(f"{hf}.down_proj", (*ours, "fc2"))


def _mapping(cfg: dict[str, Any], our_mask_token: tuple[int, ...] | None) -> list[torch_io.Entry]:
  p, c = cfg["patch_size"], cfg["channels"]
  m = [_pos_entry(cfg),
       torch_io.entry("embeddings.patch_embeddings.projection.weight", ("patch_embed", "proj", "kernel"),
                      torch_io.patch_kernel, functools.partial(torch_io.patch_kernel_to_torch, patch=p, channels=c)),
       torch_io.entry("embeddings.patch_embeddings.projection.bias", ("patch_embed", "proj", "bias"))]
  if cfg["num_registers"]:
    m.append(torch_io.entry("embeddings.register_tokens", ("registers",)))
  if cfg["mask_token"] and our_mask_token is not None:
    m.append(torch_io.entry("embeddings.mask_token", ("mask_token",),
                            lambda x: x.reshape(our_mask_token), lambda x: x.reshape(1, -1)))
  for i in range(cfg["depth"]):
    hf, ours = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
    m += torch_io.attention_entries(f"{hf}.attention", (*ours, "attn"), cfg["num_heads"], cfg["qkv_bias"])
    m += torch_io.norm_entries(f"{hf}.norm1", (*ours, "norm1")) + torch_io.norm_entries(f"{hf}.norm2", (*ours, "norm2"))
    m += [torch_io.entry(f"{hf}.layer_scale1.lambda1", (*ours, "ls1", "gamma")),
          torch_io.entry(f"{hf}.layer_scale2.lambda1", (*ours, "ls2", "gamma"))]
    if cfg["swiglu"]:
      m += _swiglu_entries(f"{hf}.mlp", (*ours, "mlp"))
    else:
      m += torch_io.dense_entries(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1"))
      m += torch_io.dense_entries(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2"))
  return m + torch_io.norm_entries("layernorm", ("norm",))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(items: tuple) -> dict[tuple[str, ...], tuple[int, ...]]:
  cfg = dict(items)
  model = build_vit(cfg)
  s = cfg["image_size"]
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(jax.random.key(0),
                                                          jnp.zeros((1, s, s, cfg["channels"])))["params"]))


def _expected_shapes(cfg):
  """Shapes of our (unrolled) param tree, from ``eval_shape`` of the real model (no compute)."""
  return _expected_shapes_cached(tuple(sorted(cfg.items())))


def convert_dinov2(source, hf_config=None, scan: bool = False, image_size: int | None = None) -> dict:
  """HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` weights -> our ``VisionTransformer`` params.

  ``source``: a torch module (its ``.config`` is used), a state dict, or a checkpoint file / HF
  directory (its ``config.json`` is used); ``hf_config`` overrides. ``image_size`` builds the
  position embedding for that resolution with HF's resampling rule. Returns numpy float32 params
  shaped like ``build_vit(hf_config, scan, image_size).init(...)``; raises one ValueError naming
  every unused / missing / mis-shaped tensor.
  """
  state_dict, hf_config = torch_io.resolve_source(source, hf_config, _WHAT)
  cfg = _as_cfg(hf_config, image_size)
  sd = normalize_hf_names(state_dict)
  expected = _expected_shapes(cfg)
  mapping = _mapping(cfg, expected.get(("mask_token",)))
  # Dinov2WithRegisters with num_register_tokens=0 holds an empty [1, 0, D] tensor: nothing to map.
  empty_registers = not cfg["num_registers"] and np.size(sd.get("embeddings.register_tokens", 1)) == 0
  consumed = ("embeddings.register_tokens",) if empty_registers else ()
  flat = torch_io.convert_with_mapping(sd, mapping, expected, "convert_dinov2", consumed)
  return torch_io.to_param_tree(flat, scan)


def export_dinov2(params: dict, hf_config, image_size: int | None = None) -> dict[str, np.ndarray]:
  """Inverse of :func:`convert_dinov2` -> a current-transformers state dict (numpy) that
  ``load_state_dict(strict=True)`` accepts for an HF model whose ``image_size`` is ours."""
  cfg = _as_cfg(hf_config, image_size)
  flat = torch_io.from_param_tree(params)
  our_mask = flat.get(("mask_token",))
  out = torch_io.export_with_mapping(flat, _mapping(cfg, None if our_mask is None else our_mask.shape),
                                     "export_dinov2")
  if cfg["mask_token"] and our_mask is None:
    out["embeddings.mask_token"] = np.zeros((1, cfg["width"]), np.float32)
  if cfg["registers"] and not cfg["num_registers"]:
    out["embeddings.register_tokens"] = np.zeros((1, 0, cfg["width"]), np.float32)
  return out


def load(source, hf_config=None, scan: bool = False, image_size: int | None = None,
         **overrides) -> tuple[vit.VisionTransformer, dict, dict]:
  """``(module, params, config_overrides)`` from an HF ``Dinov2Model`` / ``Dinov2WithRegistersModel``
  directory, weights file, state dict (with ``hf_config``) or torch module, built for
  ``image_size`` (default HF's); ``overrides`` (dtype, remat, ...) go to ``VisionTransformer``.
  ``config_overrides`` is None for models our run configs cannot build (``qkv_bias=False``)."""
  state_dict, hf_config = torch_io.resolve_source(source, hf_config, _WHAT)
  cfg = _as_cfg(hf_config, image_size)
  fields = config_overrides(cfg) if cfg["qkv_bias"] else None
  return build_vit(cfg, scan, **overrides), convert_dinov2(state_dict, cfg, scan), fields


def hf_config_dict(config) -> dict[str, Any]:
  """The HF ``config.json`` (``Dinov2Config``, or ``Dinov2WithRegistersConfig`` with registers) of
  our config, at its ``image_size``."""
  c = _as_cfg(config)
  out = dict(model_type="dinov2", architectures=["Dinov2Model"], hidden_size=c["width"],
             num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
             hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"], image_size=c["image_size"],
             patch_size=c["patch_size"], num_channels=c["channels"], qkv_bias=c["qkv_bias"],
             layerscale_value=c["layerscale_value"], use_swiglu_ffn=c["swiglu"])
  if c["registers"]:
    out.update(model_type="dinov2_with_registers", architectures=["Dinov2WithRegistersModel"],
               num_register_tokens=c["num_registers"])
  return out


def export(params: dict, config, out_dir) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that ``Dinov2Model`` (or
  ``Dinov2WithRegistersModel``) ``.from_pretrained`` loads, at our image size. ``config``: what
  :func:`load` took, our config or a run config (see :func:`cfg_from_run`)."""
  cfg = _as_cfg(config)
  flat = traverse_util.flatten_dict(vit.unstack_layers(torch_io.host_params(params)))
  if cfg.get("pos_embed") == "sincos2d":     # our fixed positions, written as HF's learned ones
    g = cfg["image_size"] // cfg["patch_size"]
    flat[("pos_embed",)] = layers.sincos_2d(cfg["width"], g, g)[None]
  for i in range(cfg["depth"]):              # no LayerScale = LayerScale 1
    for ls in ("ls1", "ls2"):
      flat.setdefault(("encoder", f"layer_{i}", ls, "gamma"), np.ones((cfg["width"],), np.float32))
  return torch_io.write_hf(out_dir, export_dinov2(traverse_util.unflatten_dict(flat), cfg), hf_config_dict(cfg))
