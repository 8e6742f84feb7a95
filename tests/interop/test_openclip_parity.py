"""open_clip's standard CLIP: imported weights give open_clip's image / text features (float32,
<= 1e-5), and an export loads back with ``open_clip.create_model('local-dir:...')``."""
import json

import jax
import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch

from medfm_jax.interop import openclip, timm_vit

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


@pytest.mark.parametrize("timm_tower, bert_tower, custom_text", [(True, False, False), (False, True, False),
                                                                   (False, False, True)])
@pytest.mark.slow
def test_mixed_tower_layouts(timm_tower, bert_tower, custom_text, tmp_path):
  """A timm trunk with open_clip's own text transformer (QuickGELU there only: timm towers ignore
  ``quick_gelu``), open_clip's own ViT with a BERT tower, and open_clip's own towers in a
  ``CustomTextCLIP`` (text under ``text.``): import and round-trip parity."""
  ref_model, src = _biomedclip_source(tmp_path, "cls_last_hidden_state_pooler", "mlp", "linear",
                                      timm_tower=timm_tower, bert_tower=bert_tower, custom_text=custom_text)
  assert custom_text == (type(ref_model).__name__ == "CustomTextCLIP" and not bert_tower)
  images, tokens = _inputs()
  ref = _features(ref_model, images, tokens)
  model, params, overrides = openclip.load(src)
  assert overrides["model.ln_pre"] != timm_tower and overrides["model.text.post_ln"] == bert_tower
  assert overrides["model.activation"] == ("gelu" if timm_tower else "quick_gelu")
  with jax.default_matmul_precision("highest"):
    ours = model.apply({"params": params}, images, tokens.astype(np.int32), attention_mask=tokens != 0)
  openclip.export(params, src, tmp_path / "out")
  back = _features(open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval(), images, tokens)
  errs = [np.abs(np.asarray(a) - b).max() for a, b in zip(ours * 2, ref + back)]
  print(f"mixed layout timm={timm_tower} bert={bert_tower} custom_text={custom_text}: import {max(errs[:2]):.1e} round trip {max(errs[2:]):.1e}")
  assert max(errs) <= ATOL, errs


def _siglip_source(tmp_path, **text):
  """A tiny random model in open_clip's SigLIP layout (timm MAP-pooled trunk without class token or
  projection; its own bidirectional text tower pooled at the last position, biased projection, LN
  eps 1e-6; logit bias) saved as an open_clip directory; ``text``: text_cfg overrides."""
  trunk = dict(channels=3, image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, ln_pre=False,
               layer_scale=False, class_token=False)
  (tmp_path / "trunk").mkdir()
  (tmp_path / "trunk" / "config.json").write_text(json.dumps(timm_vit.timm_config_dict(trunk)))
  model_cfg = dict(embed_dim=32, init_logit_bias=-10.0, custom_text=True,
                   vision_cfg=dict(timm_model_name=f"local-dir:{tmp_path / 'trunk'}", timm_pool="map", timm_proj="none",
                                   image_size=16),
                   text_cfg=dict(MODEL_CFG["text_cfg"], no_causal_mask=True, proj_bias=True, pool_type="last",
                                 norm_kwargs={"eps": 1e-6}, **text))
  src = tmp_path / "src"
  src.mkdir()
  (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  torch.manual_seed(0)
  ref_model = open_clip.create_model(f"local-dir:{src}").eval()
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for p in ref_model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  safetensors.torch.save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()},
                              str(src / "open_clip_model.safetensors"))
  return ref_model, src


def test_siglip_layout_import_export(tmp_path):
  """open_clip's SigLIP layout (:func:`_siglip_source`): import and round-trip parity; the run
  fields are a SigLIP run's."""
  ref_model, src = _siglip_source(tmp_path)
  images, tokens = _inputs()
  ref = _features(ref_model, images, tokens)
  model, params, overrides = openclip.load(src)
  assert overrides["objective.loss"] == "siglip" and overrides["model.image_pool"] == "map"
  assert not overrides["model.class_token"] and overrides["model.text.pooling"] == "last"
  with jax.default_matmul_precision("highest"):
    ours = model.apply({"params": params}, images, tokens.astype(np.int32))
  np.testing.assert_array_equal(params["logit_bias"], ref_model.logit_bias.detach().numpy())
  openclip.export(params, src, tmp_path / "out")
  back = _features(open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval(), images, tokens)
  errs = [np.abs(np.asarray(a) - b).max() for a, b in zip(ours * 2, ref + back)]
  print(f"siglip layout: import {max(errs[:2]):.1e} round trip {max(errs[2:]):.1e}")
  assert max(errs) <= ATOL, errs


def test_unsupported_and_bad_keys_are_one_line(tmp_path):
  """open_clip's SigLIP layout (timm MAP-pooled trunk, logit bias) and HF towers other than BERT:
  one line naming every field; a renamed tensor: one line naming it."""
  so400m = dict(MODEL_CFG, init_logit_bias=-10.0,
                vision_cfg=dict(timm_model_name="vit_so400m_patch14_siglip_384", timm_pool="map", timm_proj="none"),
                text_cfg=dict(MODEL_CFG["text_cfg"], act_kwargs={"approximate": "tanh"}, pool_type="last"))
  with pytest.raises(ValueError, match=r"^unsupported open_clip CLIP: text_cfg.act_kwargs=\{'approximate': 'tanh'\}; "
                                       r"vision_cfg.timm_model_name='vit_so400m_patch14_siglip_384' \(allowed [^\n]*$"):
    openclip.config_from_open_clip(so400m)
  siglip_text = dict(MODEL_CFG, init_logit_bias=-10.0)
  with pytest.raises(ValueError, match=r"^unsupported open_clip CLIP: SigLIP \(init_logit_bias set\) needs MAP-pooled "
                                       r"timm trunk, text_cfg.proj_bias=True, text_cfg.pool_type='last', "
                                       r"text_cfg.no_causal_mask=True$"):
    openclip.config_from_open_clip(siglip_text)
  roberta = dict(MODEL_CFG, text_cfg=dict(hf_model_name="roberta-base", hf_pooler_type="max_pooler"))
  with pytest.raises(ValueError, match=r"^unsupported open_clip CLIP: text_cfg.hf_model_name model_type='roberta' "
                                       r"\(allowed 'bert'\); text_cfg.hf_pooler_type='max_pooler' \(allowed [^\n]*$"):
    openclip.config_from_open_clip(roberta, hf_text_config={"model_type": "roberta"})
  with pytest.raises(ValueError, match=r"^unsupported open_clip CLIP: text_cfg.hf_model_name='/nowhere/bert': its "
                                       r"config.json is [^\n]*pass hf_text_config=[^\n]*$"):
    openclip.config_from_open_clip(dict(MODEL_CFG, text_cfg=dict(hf_model_name="/nowhere/bert")))
  model = _source(tmp_path)
  sd = dict(model.state_dict())
  sd["visual.extra"] = sd.pop("visual.proj")
  with pytest.raises(ValueError, match=r"^convert \(open_clip CLIP\): unused HF tensors: visual.extra; "
                                       r"missing HF tensors: visual.proj[^\n]*$"):
    openclip.load(sd, MODEL_CFG)


def _biomedclip_source(tmp_path, pooler, proj, timm_proj, vocab=100, positions=24, timm_tower=True, bert_tower=True,
                       custom_text=False):
  """A tiny random BiomedCLIP-layout open_clip model (timm ViT trunk + HF BERT text tower, both from
  local config directories: no network) saved as an open_clip directory; ``timm_tower`` /
  ``bert_tower`` False: open_clip's own ViT / text transformer (:data:`MODEL_CFG`, QuickGELU) instead
  (``custom_text``: in a ``CustomTextCLIP``)."""
  import transformers  # pylint: disable=import-outside-toplevel  (the 'parity' extra)
  bert = tmp_path / "bert"
  transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=positions).save_pretrained(bert)
  trunk = dict(channels=3, image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, ln_pre=False,
               layer_scale=False)
  (tmp_path / "trunk").mkdir()
  (tmp_path / "trunk" / "config.json").write_text(json.dumps(timm_vit.timm_config_dict(trunk)))
  embed = 32 if proj is None else 24     # no projections: the towers' width is the embedding
  model_cfg = dict(embed_dim=embed, quick_gelu=True,
                   vision_cfg=dict(timm_model_name=f"local-dir:{tmp_path / 'trunk'}", timm_pool="" if timm_proj == "linear" else "token",
                                   timm_proj=timm_proj, image_size=16) if timm_tower else MODEL_CFG["vision_cfg"],
                   text_cfg=dict(hf_model_name=str(bert), hf_tokenizer_name=str(bert), hf_proj_type=proj,
                                 hf_pooler_type=pooler, context_length=16) if bert_tower else MODEL_CFG["text_cfg"])
  if custom_text:
    model_cfg["custom_text"] = True
  src = tmp_path / "src"
  src.mkdir()
  (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  torch.manual_seed(0)                   # the random init (reproducible maxima)
  model = open_clip.create_model(f"local-dir:{src}", pretrained_text=False).eval()
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(src / "open_clip_model.safetensors"))
  return model, src


@pytest.mark.parametrize("pooler,proj,timm_proj", [("cls_last_hidden_state_pooler", "mlp", "linear"),
                                                   ("cls_pooler", "linear", "linear"), ("mean_pooler", None, "none")])
def test_biomedclip_layout_import_export(pooler, proj, timm_proj, tmp_path):
  """BiomedCLIP's layout (timm ViT trunk + post-LN BERT text tower, its pooler and projection):
  import parity with open_clip (padding from the attention mask, as open_clip's tokens != pad id),
  then export -> open_clip local-dir -> our features; and the run fields of the post-LN tower."""
  ref_model, src = _biomedclip_source(tmp_path, pooler, proj, timm_proj)
  images, tokens = _inputs()
  ref_img, ref_txt = _features(ref_model, images, tokens)
  model, params, overrides = openclip.load(src)
  assert overrides["model.text.post_ln"] and overrides["model.text.mask_padding"]
  assert overrides["model.text_proj"] == {"mlp": "mlp", "linear": "linear", None: "none"}[proj]
  mask = tokens != 0
  with jax.default_matmul_precision("highest"):
    img, txt = model.apply({"params": params}, images, tokens.astype(np.int32), attention_mask=mask)
  errs = [np.abs(np.asarray(img) - ref_img).max(), np.abs(np.asarray(txt) - ref_txt).max()]
  openclip.export(params, src, tmp_path / "out")
  back = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
  back_img, back_txt = _features(back, images, tokens)
  errs += [np.abs(np.asarray(img) - back_img).max(), np.abs(np.asarray(txt) - back_txt).max()]
  print(f"biomedclip layout {pooler}/{proj}/{timm_proj}: import {max(errs[:2]):.1e} round trip {max(errs[2:]):.1e}")
  assert max(errs) <= ATOL, errs


def test_run_configs_that_a_format_cannot_express_are_one_line():
  """A BiomedCLIP-layout run: HF CLIPModel cannot hold its post-LN text tower / 'mlp' projection;
  open_clip refuses a causal BERT tower; each in one line."""
  from medfm_jax.interop import hf_clip  # pylint: disable=import-outside-toplevel
  from tests import helpers  # pylint: disable=import-outside-toplevel
  run = {"model.patch_embed": "patch", "model.cls_pool": "token", "model.layer_scale_init": 0.0, "model.ln_pre": True,
         "model.text.post_ln": True, "model.text.embed_norm": True, "model.text_proj": "mlp", "data.channels": 3,
         "model.text.pooling": "cls"}
  with pytest.raises(ValueError, match=r"^cannot export to HF clip: model.text.pooling='cls' [^\n]*model.text_proj='mlp' "
                                       r"\(allowed 'linear'\); model.text.post_ln=True \(allowed False\); "
                                       r"model.text.embed_norm=True \(allowed False\)$"):
    hf_clip.cfg_from_run(helpers.tiny_clip_config(**run, **{"model.activation": "quick_gelu"}))
  with pytest.raises(ValueError, match=r"^cannot export to open_clip CLIP: model.text.causal=True \(allowed False\)$"):
    openclip.cfg_from_run(helpers.tiny_clip_config(**run, **{"model.layer_norm_eps": 1e-5}))
