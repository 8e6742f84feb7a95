"""open_clip's standard CLIP: imported weights give open_clip's image / text features (float32,
<= 1e-5), and an export loads back with ``open_clip.create_model('local-dir:...')``."""
import json

import jax
import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch

from medfm_jax.interop import openclip

ATOL = 1e-5
MODEL_CFG = dict(embed_dim=24, quick_gelu=True,
                 vision_cfg=dict(layers=2, width=32, head_width=8, mlp_ratio=2.0, patch_size=4, image_size=16),
                 text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=4, layers=2))


def _source(tmp_path, **text):
  model_cfg = dict(MODEL_CFG, text_cfg=dict(MODEL_CFG["text_cfg"], **text))
  model = open_clip.model.CLIP(**{k: v for k, v in model_cfg.items() if k != "vision_cfg" and k != "text_cfg"},
                               vision_cfg=open_clip.model.CLIPVisionCfg(**model_cfg["vision_cfg"]),
                               text_cfg=open_clip.model.CLIPTextCfg(**model_cfg["text_cfg"])).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  tmp_path.mkdir(exist_ok=True)
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(tmp_path / "open_clip_model.safetensors"))
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  return model


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  tokens = np.zeros((3, 16), np.int64)
  for i, n in enumerate((4, 9, 14)):
    tokens[i, :n] = rng.integers(1, 98, n)
    tokens[i, n] = 98 if i else 99            # end of text (the largest id but for row 0)
  return images, tokens


def _features(model, images, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy(),
            model.encode_text(torch.from_numpy(tokens)).numpy())


@pytest.mark.parametrize("pool", ["argmax", "eos"])
def test_import_export_round_trip(pool, tmp_path):
  """Import parity (argmax and first-EOS pooling); export of scanned params with a non-zero patch
  bias (folded into the positions) -> open_clip local-dir -> our features."""
  ref_model = _source(tmp_path / "src", pool_type=pool, eos_id=98)
  images, tokens = _inputs()
  ref_img, ref_txt = _features(ref_model, images, tokens)
  model, params, overrides = openclip.load(tmp_path / "src", scan=True)
  assert overrides["model.text.pooling"] == {"argmax": "argmax", "eos": "eot"}[pool]
  with jax.default_matmul_precision("highest"):
    img, txt = model.apply({"params": params}, images, tokens.astype(np.int32))
  assert np.abs(np.asarray(img) - ref_img).max() <= ATOL and np.abs(np.asarray(txt) - ref_txt).max() <= ATOL
  bias = params["image"]["patch_embed"]["proj"]["bias"]
  params["image"]["patch_embed"]["proj"]["bias"] = bias + np.linspace(-0.2, 0.2, bias.size, dtype=np.float32)
  openclip.export(params, tmp_path / "src", tmp_path / "out")
  back = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
  with jax.default_matmul_precision("highest"):
    img, txt = model.apply({"params": params}, images, tokens.astype(np.int32))
  back_img, back_txt = _features(back, images, tokens)
  assert np.abs(np.asarray(img) - back_img).max() <= ATOL and np.abs(np.asarray(txt) - back_txt).max() <= ATOL


def test_unsupported_and_bad_keys_are_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"^unsupported open_clip CLIP: vision_cfg.timm_model_name='vit_base_patch16_224'; "
                                       r"text_cfg.hf_model_name='bert'$"):
    openclip.config_from_open_clip(dict(MODEL_CFG, vision_cfg={"timm_model_name": "vit_base_patch16_224"},
                                        text_cfg={"hf_model_name": "bert"}))
  model = _source(tmp_path)
  sd = dict(model.state_dict())
  sd["visual.extra"] = sd.pop("visual.proj")
  with pytest.raises(ValueError, match=r"^convert \(open_clip CLIP\): unused HF tensors: visual.extra; "
                                       r"missing HF tensors: visual.proj[^\n]*$"):
    openclip.load(sd, MODEL_CFG)
