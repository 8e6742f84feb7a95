"""FLAVA model: shapes, logical names on every param, padding invariance of the fused states, the
image tower as a plain restorable ViT, and building from a config.

Params come from helpers.random_params (numpy, nothing to compile) and their names from
jax.eval_shape; forwards run as one jitted program per model, method and shape (eager, every op
compiles on its own)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import flava as flava_config
from medfm_jax.models import flava, vit
from medfm_jax.parallel import programs
from tests import helpers

TOP_LEVEL = {"image", "text", "multimodal", "image_to_mm", "text_to_mm", "image_projection",
             "text_projection", "mim_head", "mlm_head", "mmm_image_head", "mmm_text_head", "itm_head",
             "logit_scale"}


def _inputs(seed=0, b=2):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(b, 16, 16, 3)).astype(np.float32)
  tokens = np.zeros((b, 8), np.int32)
  tokens[:, :5] = rng.integers(1, 50, (b, 5))
  tokens[1, 3:] = 0                          # a shorter text
  return images, tokens


@functools.partial(jax.jit, static_argnums=0, static_argnames="method")
def _apply(model, params, *args, method=None, **kwargs):
  return model.apply({"params": params}, *args, method=method, **kwargs)


@pytest.fixture(scope="module")
def tiny():
  model = helpers.tiny_flava_model()
  images, tokens = _inputs()
  boxed = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
  # non-trivial everywhere, cls / mask tokens included (initialised to zeros)
  return model, boxed, helpers.random_params(boxed, seed=1)


@pytest.mark.slow
def test_shapes_and_logical_names(tiny):
  model, boxed, params = tiny
  assert set(boxed) == TOP_LEVEL
  assert isinstance(model.image, vit.VisionTransformer)
  for path, leaf in traverse_util.flatten_dict(boxed).items():
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
  images, tokens = _inputs()
  mask = np.zeros((2, 16), bool)
  mask[:, ::3] = True
  out = _apply(model, params, images, tokens, patch_mask=mask)
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == dict(image_hidden=(2, 17, 32), text_hidden=(2, 8, 32), mm_hidden=(2, 1 + 17 + 8, 32),
                        image_embedding=(2, 24), text_embedding=(2, 24), mim_logits=(2, 17, 48),
                        mlm_logits=(2, 8, 50), mmm_image_logits=(2, 16, 48), mmm_text_logits=(2, 8, 50),
                        itm_logits=(2, 2), logit_scale=())
  assert out["image_embedding"].dtype == jnp.float32 and out["itm_logits"].dtype == jnp.float32
  # the patch mask swaps in the mask token: masked rows change, the methods compose like __call__
  hidden = _apply(model, params, images, mask, method="encode_image")
  np.testing.assert_allclose(hidden, out["image_hidden"], atol=1e-6)
  unmasked = _apply(model, params, images, method="encode_image")
  assert np.abs(unmasked - hidden).max() > 1e-3
  # the init's logit scale (XLA drops the rest of the init from this program)
  logit_scale = programs.jit_once(lambda k: nn.unbox(model.init(k, images, tokens)["params"]["logit_scale"]))
  np.testing.assert_allclose(float(logit_scale(jax.random.key(0))), np.log(1 / 0.07), rtol=1e-6)
  assert float(out["logit_scale"]) == float(params["logit_scale"])


def _fuse_all(module, images, tokens):
  img = module.encode_image(images, return_pre_norm=True)[1]
  txt = module.encode_text(tokens, return_pre_norm=True)[1]
  mm = module.fuse(img, txt, tokens)
  return mm, module.itm_logits(mm)


@pytest.mark.slow
def test_padding_does_not_change_fused_states(tiny):
  model, _, params = tiny
  images, tokens = _inputs()
  longer = np.pad(tokens, ((0, 0), (0, 4)))               # 4 more padding positions
  mm, itm = _apply(model, params, images, tokens, method=_fuse_all)
  mm_long, itm_long = _apply(model, params, images, longer, method=_fuse_all)
  n = 1 + 17 + 3                                           # mm cls, image, the shorter text's tokens
  np.testing.assert_allclose(mm_long[:, :n], mm[:, :n], atol=2e-5)
  np.testing.assert_allclose(itm_long, itm, atol=2e-5)
  # ... while the padding *is* attended to without the mask
  loose = model.clone(text=model.text.clone(mask_padding=False))
  mm_loose, _ = _apply(loose, params, images, longer, method=_fuse_all)
  assert np.abs(mm_loose[:, :n] - mm[:, :n]).max() > 1e-3


@pytest.mark.slow
def test_image_tower_is_a_plain_vit(tiny):
  model, _, params = tiny
  images, _ = _inputs()
  direct = _apply(model.image, params["image"], images)
  np.testing.assert_allclose(direct, _apply(model, params, images, method="encode_image"), atol=1e-6)


def _config(**objective):
  c = ml_collections.ConfigDict(dict(dtype="float32", data=dict(image_size=16, channels=1),
                                     model=flava.model_fields("tiny"), objective=dict(objective)))
  c.model.update(variant="Mu/4", width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64, context_length=12)
  c.model.multimodal.update(width=32, mlp_dim=64, num_heads=2)
  return c


class _Tok:
  eot_id, pad_id, mask_id = 258, 0, 259


def test_build_flava_from_config():
  model = flava.build_flava(_config(mim_target="pixels"), _Tok())
  assert model.image.mask_token and model.image_vocab == 4 * 4 * 1 and model.text_vocab == 260
  assert model.text.embed_norm and not model.text.causal and model.mm_depth == 1
  assert flava.build_flava(_config(mim_target="codebook", codebook_size=77), _Tok()).image_vocab == 77
  c = _config(mim_target="pixels")
  c.model.image_vocab = 9
  assert flava.build_flava(c, _Tok()).image_vocab == 9
  with pytest.raises(ValueError, match="objective.mim_target='dvae'"):
    flava.build_flava(_config(mim_target="dvae"), _Tok())
  with pytest.raises(ValueError, match="objective.codebook_size"):
    flava.build_flava(_config(mim_target="codebook"), _Tok())
  c = _config()
  c.model.text.vocab_size = 259
  with pytest.raises(ValueError, match="model.text.vocab_size=259.*at least 260"):
    flava.build_flava(c, _Tok())
  c = _config()
  c.model.multimodal.depth = 0
  with pytest.raises(ValueError, match="model.multimodal.depth"):
    flava.build_flava(c, _Tok())
  full = flava.model_fields("full")
  assert (full["width"], full["depth"], full["text"]["depth"], full["multimodal"]["depth"],
          full["text"]["vocab_size"], full["embed_dim"]) == (768, 12, 12, 6, 30522, 768)


def test_config_image_towers():
  """configs/flava.py:tiny builds the image tower of configs/clip.py:tiny (conv stem, max-pooled
  cls slot, LayerScale 0.1: what makes the tiny run beat random init), :full FLAVA's plain ViT, and
  the fields can be overridden."""
  towers = {}
  for arg in ("tiny", "full", "full,model.patch_embed=conv,model.cls_pool=mean,model.layer_scale_init=0.5"):
    image = flava.build_flava(flava_config.get_config(arg), _Tok()).image
    towers[arg.split(",")[0] if arg.count(",") == 0 else "override"] = (
        image.patch_embed, image.cls_pool, image.layer_scale_init)
  assert towers == {"tiny": ("conv", "max", 0.1), "full": ("patch", "token", 0.0),
                    "override": ("conv", "mean", 0.5)}
