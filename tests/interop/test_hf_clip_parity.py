"""Parity with Hugging Face CLIPModel / SiglipModel: imported weights give the same image/text
embeddings, logits and loss (float32, highest matmul precision) as the torch models."""
import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from medfm_jax.interop import hf_clip
from medfm_jax.objectives import clip_losses

VOCAB, CONTEXT = 100, 16
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=16, patch_size=4, num_channels=3)
_TEXT = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=CONTEXT)


def _clip():
  config = transformers.CLIPConfig(text_config=dict(_TEXT, eos_token_id=VOCAB - 1, pad_token_id=0),
                                   vision_config=_VISION, projection_dim=20)
  return transformers.CLIPModel(config).eval(), config


def _siglip():
  config = transformers.SiglipConfig(text_config=dict(_TEXT, hidden_size=32, projection_size=32),
                                     vision_config=_VISION)
  return transformers.SiglipModel(config).eval(), config


def _inputs(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
  tokens = np.zeros((batch, CONTEXT), np.int64)
  for i, n in enumerate(rng.integers(3, CONTEXT - 1, batch)):   # body ids 1..VOCAB-2, EOT, pad 0
    tokens[i, :n] = rng.integers(1, VOCAB - 1, n)
    tokens[i, n] = VOCAB - 1
  return images, tokens


def _randomize(model, seed=1):
  """Non-trivial norms/biases/scales (HF inits LN to 1/0 and some biases to 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in ("logit_scale", "logit_bias"):
        continue
      p.add_(0.05 * torch.randn(p.shape, generator=g))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _embed_and_loss(model, params, images, tokens, kind):
  """Our image and text embeddings and contrastive loss as one program (eager, every op of the
  model compiles on its own); one per model, shared by the parity and export tests."""
  img, txt = model.apply({"params": params}, images, tokens)
  return img, txt, clip_losses.contrastive_loss(img, txt, params["logit_scale"], params.get("logit_bias"), kind)


@pytest.mark.parametrize("kind, scan", [("clip", False), ("clip", True), ("siglip", False)])
@pytest.mark.slow
def test_parity(kind, scan):
  torch_model, config = _clip() if kind == "clip" else _siglip()
  _randomize(torch_model)
  images, tokens = _inputs()
  with torch.no_grad():
    kwargs = dict(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                  return_loss=True)
    if kind == "clip":
      kwargs["attention_mask"] = torch.from_numpy((tokens != 0).astype(np.int64))
    ref = torch_model(**kwargs)
  model = hf_clip.build_model(config, scan=scan)
  params = hf_clip.convert(torch_model, config, scan=scan)
  with jax.default_matmul_precision("highest"):
    img, txt, loss = _embed_and_loss(model, params, images, tokens.astype(np.int32), kind)
  bias = params.get("logit_bias")
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(img), ref.image_embeds.numpy(), atol=1e-5)   # HF returns them normalised
  np.testing.assert_allclose(unit(txt), ref.text_embeds.numpy(), atol=1e-5)
  logits = np.exp(float(params["logit_scale"])) * unit(img) @ unit(txt).T + (0.0 if bias is None else float(bias))
  np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ref.loss), atol=1e-5, rtol=1e-6)


def test_bad_state_dict_lists_problems():
  torch_model, config = _clip()
  sd = {k: v for k, v in torch_model.state_dict().items() if "fc2" not in k}
  sd["extra.weight"] = torch.zeros(2)
  with pytest.raises(ValueError, match="unused HF tensors: extra.weight.*missing HF tensors"):
    hf_clip.convert(sd, config)


def _text_embeds(torch_model, tokens, mask):
  with torch.no_grad():
    out = torch_model.get_text_features(input_ids=torch.from_numpy(tokens),
                                        attention_mask=torch.from_numpy(mask))
  return getattr(out, "pooler_output", out).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(model, params, tokens, attention_mask=None):
  return model.apply({"params": params}, tokens, attention_mask=attention_mask, method=model.encode_text)


def test_padding_comes_from_the_attention_mask_not_pad_token_id():
  """HF CLIP's default pad_token_id is 1, an ordinary id: a caption holding it must embed as in HF
  (it did not when ids equal to pad_token_id were masked: 0.18 max |diff| on that row)."""
  config = transformers.CLIPConfig(text_config=dict(_TEXT, eos_token_id=VOCAB - 1),
                                   vision_config=_VISION, projection_dim=20)
  assert config.text_config.pad_token_id == 1
  torch_model = transformers.CLIPModel(config).eval()
  _randomize(torch_model)
  _, tokens = _inputs()
  tokens[tokens == 0] = 1                                     # HF pads with its pad id ...
  tokens[:, 1] = 1                                            # ... which captions also hold
  mask = np.cumsum(tokens == VOCAB - 1, axis=1) - (tokens == VOCAB - 1) == 0   # up to the EOT
  model, params, _ = hf_clip.load(torch_model)
  ref = _text_embeds(torch_model, tokens, mask.astype(np.int64))
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  with jax.default_matmul_precision("highest"):
    for kwargs in ({}, {"attention_mask": mask}):
      ours = _encode_text(model, params, tokens.astype(np.int32), **kwargs)
      np.testing.assert_allclose(unit(ours), unit(ref), atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_export_round_trip(kind, tmp_path):
  """load(HF directory) -> scanned params with a non-zero patch bias (CLIP has none: export folds it
  into the positions) -> export -> from_pretrained: same embeddings and logits (<= 1e-5), no key
  missing or unexpected; the config.json fields come back."""
  torch_model, config = _clip() if kind == "clip" else _siglip()
  _randomize(torch_model)
  torch_model.save_pretrained(tmp_path / "src")
  model, params, overrides = hf_clip.load(tmp_path / "src", scan=True)
  assert overrides["model.width"] == 32 and overrides["objective.loss"] == kind
  bias = params["image"]["patch_embed"]["proj"]["bias"]
  params["image"]["patch_embed"]["proj"]["bias"] = bias + np.linspace(-0.3, 0.3, bias.size, dtype=np.float32)
  hf_clip.export(params, tmp_path / "src", tmp_path / "out")
  cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
  back, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  images, tokens = _inputs()
  mask = (tokens != 0).astype(np.int64)
  with torch.no_grad():
    ref = back.eval()(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                      attention_mask=torch.from_numpy(mask) if kind == "clip" else None)
  with jax.default_matmul_precision("highest"):
    img, txt, _ = _embed_and_loss(model, params, images, tokens.astype(np.int32), kind)
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(img), ref.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(unit(txt), ref.text_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(ref.logits_per_image.numpy(), np.exp(float(params["logit_scale"])) * unit(img) @ unit(txt).T
                             + float(params.get("logit_bias", 0.0)), atol=1e-4, rtol=1e-5)


def test_load_sources_and_one_line_errors(tmp_path):
  """A safetensors file (config.json beside it), a bare state dict (config passed) and the module
  give the same params; a bare state dict without a config, a wrong key and an unexportable run
  option are one-line errors naming the problem."""
  torch_model, config = _clip()
  torch_model.save_pretrained(tmp_path)
  a = hf_clip.load(tmp_path / "model.safetensors")[1]
  b = hf_clip.load(torch_model.state_dict(), config)[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=r"^HF CLIP/SigLIP: no config.json .*pass hf_config=[^\n]*$"):
    hf_clip.load(torch_model.state_dict())
  sd = dict(torch_model.state_dict())
  sd["text_model.extra"] = sd.pop("text_projection.weight")
  with pytest.raises(ValueError, match=r"^[^\n]*unused HF tensors: text_model.extra; missing HF tensors: "
                                       r"text_projection.weight[^\n]*$"):
    hf_clip.load(sd, config)


@pytest.mark.parametrize("variant", ["tiny", "tiny_siglip"])
def test_export_from_run_config(variant, tmp_path):
  """A tiny CLIP / SigLIP run's model (byte tokenizer, random weights) exports from its run config
  as the HF model that computes the same embeddings (texts padded by our tokenizer, HF given the
  attention mask); the tiny recipe's conv stem and max-pooled cls slot are refused in one line."""
  from medfm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  from medfm_jax.objectives import clip as clip_objective  # pylint: disable=import-outside-toplevel
  from tests import helpers  # pylint: disable=import-outside-toplevel
  config = helpers.tiny_clip_config(variant)
  tok = tokenizers.from_config(config.data)
  with pytest.raises(ValueError, match=r"^cannot export to HF (clip|siglip): model.patch_embed='conv' \(allowed "
                                       r"'patch'\); model.cls_pool='max' \(allowed 'token'\)[^\n]*$"):
    hf_clip.cfg_from_run(config)
  config.model.update(patch_embed="patch", cls_pool="token", layer_scale_init=0.0)
  if variant == "tiny_siglip":
    config.model.update(ln_pre=False, class_token=False, image_pool="map", image_proj=False, text_proj_bias=True,
                        embed_dim=96)
    config.model.text.update(causal=False, pooling="last")
  model = clip_objective.build_model(config, tok)
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
  tokens = np.stack([tok(t) for t in ("a small lesion", "normal chest", "fracture of the left rib")])
  params = helpers.random_params(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"])
  hf_clip.export(params, config, tmp_path)
  cls = transformers.CLIPModel if variant == "tiny" else transformers.SiglipModel
  back = cls.from_pretrained(tmp_path).eval()
  mask = (tokens != tok.pad_id).astype(np.int64)
  with torch.no_grad():
    ref = back(input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask),
               pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  with jax.default_matmul_precision("highest"):
    img, txt = jax.jit(model.apply)({"params": params}, images, tokens, attention_mask=mask)
  unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(img), ref.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(unit(txt), ref.text_embeds.numpy(), atol=1e-5)
