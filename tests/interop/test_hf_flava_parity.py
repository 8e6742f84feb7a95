"""Parity with Hugging Face FlavaForPreTraining / FlavaModel: imported weights give the same hidden
states, embeddings, contrastive logits and MIM / MLM / MMM / ITM logits (float32, highest matmul
precision), with a patch mask and padded texts; export round-trips into HF."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from medfm_jax.interop import hf_flava
from medfm_jax.models import flava
from tests.helpers import random_params

VOCAB, CONTEXT, IMAGE_VOCAB, B, L = 60, 16, 40, 3, 10
_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _hf_model():
  """A tiny random FlavaForPreTraining (float32, eval mode)."""
  config = transformers.FlavaConfig(
      image_config=dict(_TOWER, image_size=16, patch_size=4, vocab_size=IMAGE_VOCAB),
      text_config=dict(_TOWER, vocab_size=VOCAB, max_position_embeddings=CONTEXT),
      multimodal_config=dict(_TOWER, num_hidden_layers=1), hidden_size=32, projection_dim=24,
      init_codebook=False)
  model = transformers.FlavaForPreTraining(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():          # non-trivial norms, biases, cls/mask tokens (HF inits some to 0/1)
    for _, p in model.named_parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model


@pytest.fixture(scope="module")
def hf():
  return _hf_model()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
  tokens = np.zeros((B, L), np.int64)
  for i, n in enumerate((L, 6, 3)):                      # one full text, two padded (pad id 0)
    tokens[i, :n] = rng.integers(1, VOCAB, n)
  masked = np.where((rng.random((B, L)) < 0.3) & (tokens != 0), VOCAB - 1, tokens)
  patch_mask = rng.random((B, 16)) < 0.4
  return images, tokens, masked, patch_mask


def _t(x):
  return torch.from_numpy(np.asarray(x))


def _ours(module, images, tokens, masked, patch_mask):
  """Everything HF's paired forward returns, computed with our methods."""
  img = module.encode_image(images)
  attn = tokens != 0                                     # HF's attention_mask
  txt = module.encode_text(tokens, attention_mask=attn)
  img_m, img_m_pre = module.encode_image(images, patch_mask, return_pre_norm=True)
  txt_m, txt_m_pre = module.encode_text(masked, return_pre_norm=True, attention_mask=attn)
  mm = module.fuse(img_m_pre, txt_m_pre, masked, attention_mask=attn)
  _, mm_image, mm_text = flava.split_fused(mm, img.shape[1])
  return dict(image=img, text=txt, image_masked=img_m, text_masked=txt_m, mm_masked=mm,
              image_emb=module.image_embedding(img), text_emb=module.text_embedding(txt),
              itm=module.itm_logits(mm), mmm_image=module.mmm_image_logits(mm_image[:, 1:]),
              mmm_text=module.mmm_text_logits(mm_text), mim=module.mim_logits(img_m),
              mlm=module.mlm_logits(txt_m), scale=module.scale())


def _fused(module, images, tokens, patch_mask):
  img, img_pre = module.encode_image(images, patch_mask, return_pre_norm=True)
  attn = tokens != 0
  return img, module.fuse(img_pre, module.encode_text(tokens, return_pre_norm=True, attention_mask=attn)[1],
                          tokens, attention_mask=attn)


def _check(ours, ref, name):
  ours, ref = np.asarray(ours), ref.detach().numpy()
  assert ours.shape == ref.shape, name
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_pretraining_parity(hf, scan):
  images, tokens, masked, patch_mask = _inputs()
  pixels, attn = _t(images).permute(0, 3, 1, 2), _t((tokens != 0).astype(np.int64))
  with torch.no_grad():
    ref = hf(input_ids=_t(tokens), input_ids_masked=_t(masked), pixel_values=pixels, attention_mask=attn,
             bool_masked_pos=_t(patch_mask), return_loss=False)
    ref_image = hf(pixel_values=pixels, bool_masked_pos=_t(patch_mask), return_loss=False)   # MIM
    ref_text = hf(input_ids=_t(tokens), input_ids_masked=_t(masked), attention_mask=attn,     # MLM
                  return_loss=False)
  model, params, _ = hf_flava.load(hf, scan=scan)
  with jax.default_matmul_precision("highest"):
    out = model.apply({"params": params}, images, tokens.astype(np.int32), masked.astype(np.int32),
                      patch_mask, method=_ours)
  pairs = dict(image=ref.image_embeddings, text=ref.text_embeddings, image_masked=ref.image_masked_embeddings,
               text_masked=ref.text_masked_embeddings, mm_masked=ref.multimodal_masked_embeddings,
               itm=ref.itm_logits, mmm_text=ref.mmm_text_logits, mim=ref_image.mim_logits,
               mlm=ref_text.mlm_logits)
  for name, r in pairs.items():
    _check(out[name], r, name)
  # HF's MMM-image logits are flattened over the patch rows [:, 2:2+N]
  _check(np.asarray(out["mmm_image"]).reshape(-1, IMAGE_VOCAB), ref.mmm_image_logits.reshape(-1, IMAGE_VOCAB),
         "mmm_image")
  with torch.no_grad():
    flat = hf.flava
    _check(out["image_emb"], flat.image_projection(ref.image_embeddings[:, 0]), "image_emb")
    _check(out["text_emb"], flat.text_projection(ref.text_embeddings[:, 0]), "text_emb")
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  logits = np.exp(float(out["scale"])) * unit(out["image_emb"]) @ unit(out["text_emb"]).T
  _check(logits, ref.contrastive_logits_per_image, "logits_per_image")


@pytest.mark.slow
def test_flava_model_import_and_export_round_trip(hf):
  images, tokens, _, patch_mask = _inputs(1)
  base = hf.flava                                          # a FlavaModel: no heads
  model, params, _ = hf_flava.load(base)
  assert "mim_head" not in params and "image" in params
  attn = _t((tokens != 0).astype(np.int64))
  with torch.no_grad():
    ref = base(input_ids=_t(tokens), pixel_values=_t(images).permute(0, 3, 1, 2), attention_mask=attn,
               bool_masked_pos=_t(patch_mask))
  with jax.default_matmul_precision("highest"):
    img, mm = model.apply({"params": params}, images, tokens.astype(np.int32), patch_mask, method=_fused)
  _check(mm, ref.multimodal_embeddings, "multimodal")
  _check(img, ref.image_embeddings, "image")
  # export -> a fresh HF model loads it strictly and reproduces the reference
  _, full_params, _ = hf_flava.load(hf)
  fresh = transformers.FlavaForPreTraining(hf.config).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in hf_flava.export_flava(full_params, hf.config).items()},
                        strict=True)
  with torch.no_grad():
    again = fresh.flava(input_ids=_t(tokens), pixel_values=_t(images).permute(0, 3, 1, 2), attention_mask=attn,
                        bool_masked_pos=_t(patch_mask))
  _check(again.multimodal_embeddings.numpy(), ref.multimodal_embeddings, "exported")
  sd = hf_flava.export_flava(params, hf.config)            # no heads -> FlavaModel names
  assert "image_model.embeddings.cls_token" in sd and not any(k.startswith("mim_head") for k in sd)


def test_bad_state_dict_lists_problems(hf):
  sd = {k: v for k, v in hf.state_dict().items() if "layernorm_after" not in k}
  sd["extra.weight"] = torch.zeros(2)
  with pytest.raises(ValueError, match="unused HF tensors: extra.weight.*missing HF tensors.*layernorm_after"):
    hf_flava.convert_flava(sd, hf.config)
  bad = hf.config.to_dict()
  bad["multimodal_config"]["use_cls_token"] = False
  with pytest.raises(ValueError, match="use_cls_token=False"):
    hf_flava.config_from_hf(bad)


@pytest.mark.slow
def test_load_export_from_pretrained_round_trip(hf, tmp_path):
  """load(HF directory, scanned) -> export -> FlavaForPreTraining.from_pretrained: no key missing,
  unexpected or mismatched; the reloaded model reproduces our fused states and ITM / MMM-text logits
  (padded texts, a patch mask); config_overrides carry the three towers but not the MIM output
  size (a run's own MIM target sets it)."""
  hf.save_pretrained(tmp_path / "src")
  model, params, overrides = hf_flava.load(tmp_path / "src", scan=True)
  assert overrides["model.multimodal.depth"] == 1 and "model.image_vocab" not in overrides
  assert model.image_vocab == IMAGE_VOCAB
  hf_flava.export(params, tmp_path / "src", tmp_path / "out")
  back, info = transformers.FlavaForPreTraining.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  images, tokens, masked, patch_mask = _inputs(2)
  with torch.no_grad():
    ref = back.eval()(input_ids=_t(tokens), input_ids_masked=_t(masked), pixel_values=_t(images).permute(0, 3, 1, 2),
                      attention_mask=_t((tokens != 0).astype(np.int64)), bool_masked_pos=_t(patch_mask),
                      return_loss=False)
  with jax.default_matmul_precision("highest"):
    out = model.apply({"params": params}, images, tokens.astype(np.int32), masked.astype(np.int32),
                      patch_mask, method=_ours)
  for name, r in dict(mm_masked=ref.multimodal_masked_embeddings, itm=ref.itm_logits,
                      mmm_text=ref.mmm_text_logits).items():
    _check(out[name], r, name)


def test_export_from_run_config(tmp_path):
  """A tiny FLAVA run's model (byte tokenizer, pixel MIM targets, random weights) exports from its
  run config as the FlavaForPreTraining that computes the same fused states and ITM logits."""
  from medfm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  from tests import helpers  # pylint: disable=import-outside-toplevel
  config = helpers.tiny_flava_config(**{"data.channels": 3})
  tok = tokenizers.from_config(config.data)
  model = flava.build_flava(config, tok)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  tokens = np.stack([tok(t) for t in ("a small lesion", "normal chest")])
  patch_mask = rng.random((2, 16)) < 0.4
  params = random_params(jax.eval_shape(model.init, jax.random.key(0), images, tokens, patch_mask)["params"])
  hf_flava.export(params, config, tmp_path)
  back = transformers.FlavaForPreTraining.from_pretrained(tmp_path).eval()
  attn = (tokens != tok.pad_id).astype(np.int64)
  with torch.no_grad():
    ref = back(input_ids=_t(tokens.astype(np.int64)), input_ids_masked=_t(tokens.astype(np.int64)),
               pixel_values=_t(images).permute(0, 3, 1, 2), attention_mask=_t(attn), bool_masked_pos=_t(patch_mask),
               return_loss=False)
  with jax.default_matmul_precision("highest"):
    out = jax.jit(model.apply)({"params": params}, images, tokens, patch_mask, attention_mask=attn)
  _check(out["mm_hidden"], ref.multimodal_masked_embeddings, "mm")
  _check(out["itm_logits"], ref.itm_logits, "itm")
