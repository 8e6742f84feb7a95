"""timm ``vit_*`` (``timm.models.vision_transformer.VisionTransformer``) <-> our ``VisionTransformer``.

Usage (offline; a timm Hub snapshot directory with ``config.json`` + ``model.safetensors``, a state
dict, or a timm module)::

    from medfm_jax.interop import timm_vit
    model, params, overrides = timm_vit.load("/ckpts/vit_base_patch16_224.augreg_in21k")
    tokens = model.apply({"params": params}, images)  # = timm forward_features (NHWC input)
    timm_vit.export(params, overrides_or_run_config, "/out/vit")  # timm.create_model("local-dir:/out/vit")

Supported: class token (positions covering it: ``no_embed_class=False``), token pooling, LayerScale
(``init_values``), ``pre_norm`` (CLIP-style LayerNorm before the blocks, patch conv without bias),
exact GELU MLP, LayerNorm eps 1e-6 (timm's ViT default). The sizes come from the tensor shapes;
the head count from the module, the ``config.json`` (``model_args.num_heads`` or the architecture
name, e.g. ``vit_base_*``) or ``num_heads=``. A classifier ``head`` is not imported (our encoder has
none); export writes ``num_classes=0``. Not supported (one-line error): register tokens, avg/MAP
pooling (``fc_norm`` / ``attn_pool``), q/k norm.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.interop import torch_io
from medfm_jax.models import layers, vit

__all__ = ["load", "export", "convert", "export_state_dict", "config_from_state_dict", "config_overrides",
           "cfg_from_run", "timm_config_dict"]

_WHAT = "timm ViT"
EPS = 1e-6
# timm architecture size name -> heads (vit_{name}_patch..)
_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16}
_UNSUPPORTED = ("reg_token", "fc_norm.weight", "attn_pool.latent", "blocks.0.attn.q_norm.weight")


def _num_heads(source, timm_config: dict | None) -> int | None:
  if hasattr(source, "blocks"):
    return int(source.blocks[0].attn.num_heads)
  if timm_config:
    if "num_heads" in timm_config.get("model_args", {}):
      return int(timm_config["model_args"]["num_heads"])
    if m := re.match(r"vit_([a-z]+)_", timm_config.get("architecture", "")):
      return _HEADS.get(m[1])
  return None


def config_from_state_dict(sd: dict[str, np.ndarray], num_heads: int) -> dict[str, Any]:
  """Our timm-ViT config (sizes read from the tensor shapes)."""
  if bad := [k for k in _UNSUPPORTED if k in sd]:
    raise ValueError(f"unsupported {_WHAT}: {', '.join(bad)} (register tokens, avg/MAP pooling and q/k "
                     "norm have no equivalent here)")
  if "cls_token" not in sd or "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
    raise ValueError(f"{_WHAT}: missing tensors {[k for k in ('cls_token', 'pos_embed', 'patch_embed.proj.weight') if k not in sd]}")
  width, channels, patch, _ = sd["patch_embed.proj.weight"].shape
  grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
  if grid * grid != sd["pos_embed"].shape[1] - 1:
    raise ValueError(f"{_WHAT}: pos_embed {sd['pos_embed'].shape} does not cover a cls token and a square grid")
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  return dict(timm=True, width=int(width), depth=depth, num_heads=int(num_heads),
              mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), patch_size=int(patch),
              image_size=grid * int(patch), channels=int(channels), layer_scale="blocks.0.ls1.gamma" in sd,
              ln_pre="norm_pre.weight" in sd, layer_norm_eps=EPS)


def cfg_from_run(config) -> dict[str, Any]:
  """Our timm-ViT config of a run config's image encoder; one ValueError line for what timm's
  ``VisionTransformer`` cannot express here."""
  v = torch_io.run_vit(config, _WHAT, pos_embed=("learned", "sincos2d"), num_registers=(0,), swiglu=(False,),
                       activation=("gelu",), class_token=(True,), layer_norm_eps=(EPS,))
  return {k: v[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "channels",
                            "ln_pre", "layer_norm_eps", "pos_embed")} | dict(
      timm=True, layer_scale=bool(v["layer_scale_init"]))


def _read_source(source, num_heads: int | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(numpy state dict, our config) of a timm module, state dict, weights file or directory."""
  timm_config = None
  if torch_io.is_path(source):
    cfg_file = torch_io.beside(source, "config.json")
    if cfg_file.is_file():
      timm_config = json.loads(cfg_file.read_text())
  heads = num_heads or _num_heads(source, timm_config)
  if not heads:
    raise ValueError(f"{_WHAT}: the head count is not in the source; pass num_heads=")
  sd = torch_io.as_numpy_state_dict(source)
  return sd, config_from_state_dict(sd, heads)


def _as_cfg(config) -> dict[str, Any]:
  """Our timm config from itself, a run config, or a source :func:`load` takes."""
  return torch_io.as_family_cfg(config, "timm", cfg_from_run, lambda source: _read_source(source, None)[1])


def block_entries(hf: str, ours: tuple[str, ...], heads: int, layer_scale: bool) -> list[torch_io.Entry]:
  """One timm ``Block`` at ``hf`` <-> our Block at ``ours``."""
  dense, norm = torch_io.dense_entries, torch_io.norm_entries
  m = (norm(f"{hf}.norm1", (*ours, "norm1")) + norm(f"{hf}.norm2", (*ours, "norm2"))
       + torch_io.packed_qkv_entries(f"{hf}.attn.qkv.weight", f"{hf}.attn.qkv.bias", (*ours, "attn"), heads)
       + torch_io.out_entries(f"{hf}.attn.proj", (*ours, "attn", "out"), heads)
       + dense(f"{hf}.mlp.fc1", (*ours, "mlp", "fc1")) + dense(f"{hf}.mlp.fc2", (*ours, "mlp", "fc2")))
  if layer_scale:
    m += [torch_io.entry(f"{hf}.ls1.gamma", (*ours, "ls1", "gamma")),
          torch_io.entry(f"{hf}.ls2.gamma", (*ours, "ls2", "gamma"))]
  return m


def mapping(cfg: dict[str, Any], prefix: str = "", ours: tuple[str, ...] = ()) -> list[torch_io.Entry]:
  """The timm ViT tensors (names under ``prefix``) <-> our encoder params under ``ours``."""
  p = prefix
  if cfg.get("class_token", True):
    m = [torch_io.fold_cls_position(f"{p}cls_token", f"{p}pos_embed", ours, bias_free=cfg["ln_pre"])]
  else:       # positions of the patches only (timm's SigLIP ViTs)
    m = [torch_io.entry(f"{p}pos_embed", (*ours, "pos_embed"))]
  m += [torch_io.entry(f"{p}patch_embed.proj.weight", (*ours, "patch_embed", "proj", "kernel"), torch_io.patch_kernel,
                      functools.partial(torch_io.patch_kernel_to_torch, patch=cfg["patch_size"],
                                        channels=cfg["channels"]))]
  if cfg["ln_pre"]:
    m += torch_io.norm_entries(f"{p}norm_pre", (*ours, "ln_pre"))
  else:
    m.append(torch_io.entry(f"{p}patch_embed.proj.bias", (*ours, "patch_embed", "proj", "bias")))
  for i in range(cfg["depth"]):
    m += block_entries(f"{p}blocks.{i}", (*ours, "encoder", f"layer_{i}"), cfg["num_heads"], cfg["layer_scale"])
  return m + torch_io.norm_entries(f"{p}norm", (*ours, "norm"))


def vit_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
  """``VisionTransformer`` keyword arguments of the timm model."""
  return dict(variant=torch_io.variant_name(cfg["width"], cfg["depth"], cfg["num_heads"], cfg["mlp_dim"],
                                            cfg["patch_size"]),
              width=cfg["width"], depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
              image_size=cfg["image_size"], pos_embed="learned", layer_norm_eps=cfg["layer_norm_eps"],
              layer_scale_init=1.0 if cfg["layer_scale"] else 0.0, activation="gelu", ln_pre=cfg["ln_pre"])


@functools.lru_cache(maxsize=8)
def _expected_shapes(key: str) -> dict:
  cfg = json.loads(key)
  model, s = vit.VisionTransformer(**vit_kwargs(cfg)), cfg["image_size"]
  return torch_io.flat_shapes(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, s, s, cfg["channels"])))
                                               ["params"]))


def convert(sd: dict[str, np.ndarray], cfg: dict[str, Any], scan: bool = False, prefix: str = "") -> dict:
  """timm ViT state dict (names under ``prefix``) -> our encoder params; one ValueError names every
  unused / missing / mis-shaped tensor (a classifier ``head`` is dropped)."""
  sd = {k: v for k, v in sd.items() if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}
  if cfg["ln_pre"]:
    sd[torch_io.NO_PATCH_BIAS] = np.zeros((cfg["width"],), np.float32)
  flat = torch_io.convert_with_mapping(sd, mapping(cfg, prefix), _expected_shapes(json.dumps(cfg, sort_keys=True)),
                                       f"convert ({_WHAT})")
  return torch_io.to_param_tree(flat, scan)


def config_overrides(config) -> dict[str, Any]:
  """The run-config fields that build this encoder (``vit.vit_from_config``); ``config``: our timm
  config or a source :func:`load` takes."""
  cfg = _as_cfg(config)
  kw = vit_kwargs(cfg)
  return torch_io.vit_run_fields(**{k: kw[k] for k in ("variant", "width", "depth", "num_heads", "mlp_dim",
                                                       "pos_embed", "layer_norm_eps", "layer_scale_init",
                                                       "activation", "ln_pre")}) | {
      "data.image_size": cfg["image_size"], "data.channels": cfg["channels"]}


def load(source, num_heads: int | None = None, scan: bool = False) -> tuple[vit.VisionTransformer, dict, dict]:
  """``(module, params, config_overrides)`` from a timm ViT module, state dict, weights file or Hub
  snapshot directory (``config.json`` gives the head count; else pass ``num_heads``)."""
  sd, cfg = _read_source(source, num_heads)
  return vit.VisionTransformer(**vit_kwargs(cfg), scan=scan), convert(sd, cfg, scan), config_overrides(cfg)


def export_state_dict(params: dict, cfg: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Our encoder params -> a timm ViT state dict (names under ``prefix``); fixed sin-cos positions
  are written as the learned ones they equal at ``cfg['image_size']``."""
  flat = torch_io.from_param_tree(params)
  if cfg.get("pos_embed") == "sincos2d":
    g = cfg["image_size"] // cfg["patch_size"]
    flat[("pos_embed",)] = layers.sincos_2d(cfg["width"], g, g)[None]
  return torch_io.export_with_mapping(flat, mapping(cfg, prefix), f"export ({_WHAT})")


def timm_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
  """The ``config.json`` that ``timm.create_model('local-dir:DIR')`` reads."""
  c, s = cfg["channels"], cfg["image_size"]
  cls = cfg.get("class_token", True)     # False: timm's SigLIP layout, MAP pooling (attn_pool)
  pool = "token" if cls else "map"
  args = dict(img_size=s, patch_size=cfg["patch_size"], in_chans=c, embed_dim=cfg["width"], depth=cfg["depth"],
              num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_dim"] / cfg["width"], pre_norm=cfg["ln_pre"],
              init_values=1.0 if cfg["layer_scale"] else None, global_pool=pool, class_token=cls)
  return dict(architecture="vit_base_patch16_224", num_classes=0, num_features=cfg["width"], global_pool=pool,
              model_args=args, pretrained_cfg=dict(input_size=[c, s, s], num_classes=0, mean=[0.5] * c,
                                                   std=[0.5] * c, crop_pct=1.0, interpolation="bicubic"))


def export(params: dict, config, out_dir) -> str:
  """Writes ``config.json`` + ``model.safetensors`` that ``timm.create_model('local-dir:OUT',
  pretrained=True)`` loads. ``config``: what :func:`load` took, our timm config or a run config."""
  cfg = _as_cfg(config)
  return torch_io.write_hf(out_dir, export_state_dict(params, cfg), timm_config_dict(cfg))
