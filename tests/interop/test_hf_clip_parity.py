"""Parity with Hugging Face CLIPModel / SiglipModel: imported weights give the same image/text
embeddings, logits and loss (float32, highest matmul precision) as the torch models."""
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


@pytest.mark.parametrize("kind, scan", [("clip", False), ("clip", True), ("siglip", False)])
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
    img, txt = model.apply({"params": params}, images, tokens.astype(np.int32))
    bias = params.get("logit_bias")
    loss = clip_losses.contrastive_loss(img, txt, params["logit_scale"], bias, kind)
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
