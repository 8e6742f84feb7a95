"""One load/export API per public model family (``load(source) -> (module, params,
config_overrides)``, ``export(params, config, out_dir)``), and what the trainer and the export CLI
need to pick the family of a source."""
from __future__ import annotations

import json

from medfm_jax.interop import hf_clip, hf_dinov2, hf_flava, hf_vitmae, openclip, timm_vit, torch_io

FAMILIES = {"vitmae": hf_vitmae, "dinov2": hf_dinov2, "clip": hf_clip, "flava": hf_flava, "openclip": openclip,
            "timm": timm_vit}
# Families whose params are another family's model (the same param tree): open_clip's CLIP is ours.
SAME_MODEL = {"openclip": "clip"}
# HF config.json model_type -> family
MODEL_TYPES = {"vit_mae": "vitmae", "dinov2": "dinov2", "dinov2_with_registers": "dinov2", "clip": "clip",
               "siglip": "clip", "flava": "flava"}
# Where a family's params keep its image encoder (() = the params are an image encoder).
IMAGE_ENCODERS = {"vitmae": ("encoder",), "dinov2": (), "clip": ("image",), "flava": ("image",),
                  "openclip": ("image",), "timm": ()}


def hf_family(source: str) -> str | None:
  """The family of a model directory or weights file (local or a URL, read through etils.epath):
  'openclip' beside an ``open_clip_config.json``; else from the ``config.json`` in it or beside it:
  'timm' when it names a timm ``architecture``, else its HF ``model_type``. None without either
  (e.g. one of our run workdirs, whose ``config.json`` has neither). An unknown model_type is one
  line."""
  if torch_io.beside(source, "open_clip_config.json").is_file():
    return "openclip"
  config = torch_io.beside(source, "config.json")
  if not config.is_file():
    return None
  raw = json.loads(config.read_text())
  if str(raw.get("architecture", "")).startswith("vit_"):
    return "timm"
  model_type = raw.get("model_type")
  if model_type is None:
    return None
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: HF model_type={model_type!r}; supported {sorted(MODEL_TYPES)}")
  return MODEL_TYPES[model_type]
